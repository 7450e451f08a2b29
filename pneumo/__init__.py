"""pneumo: training and retraining of pneumonia-vs-normal chest X-ray classifiers."""

__version__ = "0.1.0"
