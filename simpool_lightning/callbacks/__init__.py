"""Lightning callbacks: attention maps, predictions."""
from .prediction_writer import PredictionWriter
