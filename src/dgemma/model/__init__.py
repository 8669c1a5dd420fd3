from .backbone import Backbone
from .batch import Batch
from .cache import KVCache

__all__ = ["Backbone", "Batch", "KVCache"]
