"""Lightning callbacks: attention maps, predictions, pre-emption checkpoints, per-step seeding."""
from .prediction_writer import PredictionWriter
from .attention import AttentionMapLogger, denormalize, figure_to_array, plot_attention
from .preemption import PreemptionCheckpoint
from .seeding import SeedEveryStep
