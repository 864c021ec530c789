"""The work folder's items as model inputs: decoding, transforms, loaders, caches and the data plan."""
