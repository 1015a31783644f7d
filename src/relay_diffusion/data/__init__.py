"""Building and reading EDM-format image datasets, without importing torch.

``files``    lists and reads the images of a folder or a zip, in sorted order.
``convert``  decodes an image of any mode to uint8 ``[H, W, C]`` (C = 1 or 3), crops, resizes, encodes PNG.
``sources``  reads the inputs of ``rdm dataset``: image folders and zips, CIFAR-10, MNIST, LSUN lmdb.
``writer``   writes an EDM-format zip or folder under a temporary name and renames it into place.

The training data loader (``relay_diffusion.data.dataset``) and the builder (``relay_diffusion.data.tool``) sit on top.
"""
