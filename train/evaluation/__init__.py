"""Evaluation of digit samples: the cached classifier, feature-space metrics, and `evaluate_samples`."""
from train.evaluation.classifier import DigitsClassifier, load_digits_classifier
from train.evaluation.evaluate import evaluate_samples, format_table
from train.evaluation.metrics import class_accuracy, frechet_distance, precision_recall

__all__ = ["DigitsClassifier", "load_digits_classifier", "evaluate_samples", "format_table",
           "frechet_distance", "precision_recall", "class_accuracy"]
