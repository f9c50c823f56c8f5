"""Lightning callbacks: attention maps, predictions, pre-emption checkpoints, per-step seeding."""
from .prediction_writer import PredictionWriter
from .attention import (
    CONTOUR_COLOR,
    AttentionMapLogger,
    contour_pixels,
    denormalize,
    figure_to_array,
    overlay_attention,
    plot_attention,
)
from .preemption import PreemptionCheckpoint
from .seeding import SeedEveryStep
