from .backbone import Backbone
from .cache import KVCache

__all__ = ["Backbone", "KVCache"]
