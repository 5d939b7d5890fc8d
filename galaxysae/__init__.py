"""galaxysae: a galaxy feature atlas from sparse autoencoders on Zoobot embeddings."""

__version__ = "0.1.0"
