"""The paper's two autoencoder fine-tuning stages.

- stage 1 (`python -m lrf.finetune.stage1`): correspondence-aware autoencoding, only the
  encoder changes, so that latents of one 3D point agree across views;
- stage 3 (`python -m lrf.finetune.stage3`): VAE-RF alignment, only the decoder changes, so
  that latents rendered by a fitted latent field decode into the photos.

Both share `common` (hashes, crops, LPIPS, outputs and one command line, `stage_main`) and
lrf.train.loop (exact-resume checkpoints, progress, curves).
"""
