"""The paper's two autoencoder fine-tuning stages.

- stage 1 (`python -m lrf.finetune.stage1`): correspondence-aware autoencoding, only the
  encoder changes, so that latents of one 3D point agree across views;
- stage 3 (`python -m lrf.finetune.stage3`): VAE-RF alignment, only the decoder changes, so
  that latents rendered by a fitted latent field decode into the photos.

Both run on lrf.train.loop (exact-resume checkpoints, progress, curves) and share their command
line (`common`). Exact resumption: all sampling randomness comes from the loop's numpy
Generator, whose state is checkpointed; no op used draws from torch's RNG. So with a fixed seed
on the CPU a run killed after a checkpoint and resumed ends bit-identical to an uninterrupted one.
"""
