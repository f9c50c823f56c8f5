"""LightningModules and the timm backbone wrapper."""
from .backbone import PooledBackbone
from .schedules import cosine_schedule
from .classifier import ImageClassifier
from .dino import DINO, clip_gradients_per_parameter, dino_param_groups
from .dino_head import DINOHead, DINOLoss, MultiCropNet
