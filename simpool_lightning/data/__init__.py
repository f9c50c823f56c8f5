"""DataModules and datasets; every batch follows the dict contract of DESIGN.md."""
from .base import BaseDataModule
from .collate import collate_samples
from .io import BadImageError, FileDataset, FileSample, load_rgb
from .transforms import build_eval_transform, build_train_transform
from .cub import CUB200DataModule
from .downstream import ClassificationDataModule, DownstreamDataModule
from .classification import CIFAR10DataModule, CIFAR100DataModule, Flowers102DataModule, StanfordCarsDataModule
from .imagenet9 import IN9_CLASSES, IN9_VARIANTS, ImageNet9DataModule, in1k_to_in9_index, map_in1k_to_in9, predict_in9
from .imagenet_boxes import ImageNetBoxesDataModule
from .retrieval import RevisitedRetrievalDataModule
from .voc import VOC_CLASSES, VOCDataModule
from .coco import COCO20kDataModule
from .synthetic import SyntheticShapes, SyntheticShapesDataModule
from .multicrop import MultiCropTransform, PILGaussianBlur
from .imagenet import ImageNetDataModule
from .image_files import IMAGE_EXTENSIONS, ImageFilesDataModule, ImageFilesDataset, find_images
