"""What a variant is: the catalog, the ladder recipes that build variants, golden sets."""
