"""Document classifier: a pretrained BERT-style encoder fine-tuned to label documents.

Trained by ``python -m src.scripts.train_transfer`` through the shared engine; used with
``load_classifier(path).predict(texts)``.
"""

from src.classifier.config import TransferConfig
from src.classifier.load import DocumentClassifier, load_classifier

__all__ = ["DocumentClassifier", "TransferConfig", "load_classifier"]
