"""Region memories: each image stored as its global embedding plus G x G region embeddings (pure numpy).

``layout``: how region entries are named and tied to their image (``IMAGEID#r<i>``), the grid a manifest
records, and the expansion of an image id to all its entries (forget works on whole images). ``pooling``: the
encoder's spatial feature map averaged per grid cell. ``aggregate``: how region similarities become one score
per memory image (MaxSim). ``classify``: classify over an opened `memory.visual_memory.VisualMemory` through its
one search engine and `memory.decide`'s voting.
"""
