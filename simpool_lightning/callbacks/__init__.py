"""Lightning callbacks: attention maps, predictions."""
from .prediction_writer import PredictionWriter
from .attention import AttentionMapLogger, denormalize, figure_to_array, plot_attention
