"""Checkpoint formats from outside, one module per family, none of which knows the store:

- :mod:`.safetensors`: ``.safetensors`` files and sharded directories with
  ``model.safetensors.index.json``, read through the ``safetensors`` package;
- :mod:`.pt`: ``torch.save`` files, read with ``weights_only=True``;
- :mod:`.hf`: Hugging Face style directories, Trainer ``checkpoint-N`` folders and runs, and
  :func:`~.hf.read_checkpoint`, which reads any checkpoint on disk;
- :mod:`.directory`: an export directory built beside its target and swapped in whole;
- :mod:`.files`: checked reads and the one atomic write (:func:`~.files.write_atomically`)
  every file here is written with.

:mod:`ckptstore.transfer` turns them into commits and commits into them.
"""
