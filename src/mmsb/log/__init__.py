"""The transaction log: record types, the in-memory log, binary formats, durability."""
