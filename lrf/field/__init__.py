"""Latent / RGB Gaussian fields: the model, densification, losses, training, PLY and orbits."""
from lrf.field.gaussians import (GaussianField, eval_sh, init_features_from_tracks, quat_to_rotmat,
                                 SH_C0)
from lrf.field.losses import ChannelNorm, d_ssim, field_loss, ssim
from lrf.field.orbit import look_at_w2c, orbit_path, write_video
from lrf.field.io import field_background, load_field, read_ply, render_at, save_field, save_ply
from lrf.field.strategy import DensifyConfig, DensifyStrategy, append_rows, edit_rows, keep_rows
from lrf.field.train import FieldConfig, FitResult, fit_field

__all__ = ["GaussianField", "eval_sh", "init_features_from_tracks", "quat_to_rotmat", "SH_C0",
           "ChannelNorm", "d_ssim", "field_loss", "ssim", "look_at_w2c", "orbit_path", "write_video",
           "read_ply", "save_ply", "DensifyConfig", "DensifyStrategy", "append_rows", "edit_rows",
           "keep_rows", "FieldConfig", "FitResult", "fit_field", "load_field", "save_field", "field_background",
           "render_at"]
