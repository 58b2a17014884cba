"""Evaluation of samples: the cached feature network of a labelled data set, feature-space metrics, `evaluate_samples`."""
from train.evaluation.classifier import DigitsClassifier, FeatureNetwork, load_digits_classifier, load_feature_network
from train.evaluation.evaluate import evaluate_samples, format_table
from train.evaluation.metrics import class_accuracy, frechet_distance, precision_recall

__all__ = ["DigitsClassifier", "FeatureNetwork", "load_digits_classifier", "load_feature_network", "evaluate_samples",
           "format_table", "frechet_distance", "precision_recall", "class_accuracy"]
