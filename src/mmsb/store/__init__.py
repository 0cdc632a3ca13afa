"""Page storage: the arena of page bytes and the columnar page table."""

from .arena import Arena
from .page_table import PageTable

__all__ = ["Arena", "PageTable"]
