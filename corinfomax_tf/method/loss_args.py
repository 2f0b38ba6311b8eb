"""The loss's arguments checked as plain Python (no TensorFlow): shared by the loss
layer and the command line's config checks, which run before TensorFlow starts."""

COVARIANCE_MODES = ("per_branch", "shared")


def validate_loss_args(*, dim, alpha, cov_weight, la_R, la_mu, eps, R_ini, covariance):
  """Raises ValueError naming the argument; shared by the layer and the config."""
  if not isinstance(dim, int) or dim < 1:
    raise ValueError(f"dim must be a positive integer. Received: dim={dim!r}")
  for name, value in (("la_R", la_R), ("la_mu", la_mu)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"{name} must be in [0, 1). Received: {name}={value!r}")
  if not eps > 0:
    raise ValueError(f"eps must be > 0. Received: eps={eps!r}")
  if not R_ini > 0:
    raise ValueError(f"R_ini must be > 0 (R starts as R_ini*I). Received: R_ini={R_ini!r}")
  if alpha < 0 or cov_weight < 0:
    raise ValueError("alpha and cov_weight must be >= 0. "
                     f"Received: alpha={alpha!r}, cov_weight={cov_weight!r}")
  if covariance not in COVARIANCE_MODES:
    raise ValueError(f"covariance must be one of {COVARIANCE_MODES}. "
                     f"Received: covariance={covariance!r}")
