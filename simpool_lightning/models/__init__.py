"""LightningModules and the timm backbone wrapper."""
from .backbone import PooledBackbone
from .schedules import cosine_schedule
from .classifier import ImageClassifier
