"""Training the demo model (:mod:`demo.model`) from random weights on the shapes world.

* :mod:`.targets`: what each image token and answer word is about (per-patch labels, look modes).
* :mod:`.sampler`: training and validation examples drawn from the world (scenes, mp4 clips).
* :mod:`.batches`: examples to model inputs; packed rows share one image prefix.
* :mod:`.patch_probes`: training-only probes on the image features (:class:`AuxHeads`).
* :mod:`.look_supervision`: training-only attention supervision of chosen decoder heads.
* :mod:`.validation`: teacher-forced token accuracy and greedy answers on held-out data.
* :mod:`.loop`: the losses, the vision-only stage and the full-model stage (:func:`train`).

Nothing here is saved with the model. docs/demo_model.md tells how it is trained and why.
"""
