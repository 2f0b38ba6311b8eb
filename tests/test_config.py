"""Flags -> frozen config: every shipped flagfile parses, bad values are named."""

import glob
import os

import pytest
from absl import flags

from corinfomax_tf import config
from corinfomax_tf import flags as flags_lib
from corinfomax_tf import errors
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags_lib.define_flags()
FLAGS = flags.FLAGS


def parse(*args):
  FLAGS.unparse_flags()
  FLAGS(["prog", *args])
  return config.from_flags(FLAGS)


DOWNSTREAM_PREFIXES = ("linear_", "semisup_", "detection_", "sweep_")
PRETRAINING_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.cfg"))
                             if not os.path.basename(p).startswith(DOWNSTREAM_PREFIXES))
LINEAR_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "linear_*.cfg")))
SWEEP_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "sweep_*.cfg")))


@pytest.mark.parametrize("path", PRETRAINING_CONFIGS)
def test_every_flagfile_parses_and_opens_with_comments(path):
  # Image-folder configs need the user's --data_dir; validation does not read it.
  with open(path) as fh:
    text = fh.read()
    folder = "--dataset=folder" in text or "--dataset=images" in text
  cfg = parse(f"--flagfile={path}", *(["--data_dir=/data/images"] if folder else []))
  with open(path) as fh:
    first = fh.readline()
  assert first.startswith("# ")
  assert cfg.loss.eps == 1e-8


@pytest.mark.parametrize("path", SWEEP_CONFIGS)
def test_every_sweep_flagfile_parses_to_a_checked_sweep(path):
  from corinfomax_tf.cli import sweep as sweep_cli
  from corinfomax_tf.tuning import sweep as sweep_lib
  sweep_cli.define_flags()
  with open(path) as fh:
    text = fh.read()
  assert text.startswith("# ") and "corinfomax sweep --flagfile=configs/" in text
  FLAGS.unparse_flags()
  extra = ["--data_dir=/data/images"] if "--dataset=images" in text else []
  FLAGS(["prog", f"--flagfile={path}", *extra])
  own = {name: FLAGS[name].value for name in ("n_trials", "score", "validation_fraction",
                                               "pruner", "startup_trials")}
  cfg = sweep_lib.sweep_config(flags_lib.train_values(FLAGS), FLAGS.search, **own)
  assert len(cfg.search) == 5 and {p.name for p in cfg.search} == {
      "alpha", "la_R", "la_mu", "lr", "projector_out"}
  assert cfg.train["knn_every_epochs"] == 1 and cfg.n_trials >= 20
  FLAGS.unparse_flags()


def test_paper_settings():
  c10 = parse(f"--flagfile={ROOT}/configs/cifar10.cfg")
  assert (c10.loss.alpha, c10.model.projector, c10.train.batch_size) == (250, "2048-2048-64", 512)
  assert c10.augment.view1.blur_prob == 1.0 and c10.augment.view2.blur_prob == 0.1
  assert c10.augment.view1.solarize_prob == 0.0 and c10.augment.view2.solarize_prob == 0.2
  assert c10.data.mean == config.NORMALIZATIONS["cifar10"][0]
  in1k = parse(f"--flagfile={ROOT}/configs/imagenet1k.cfg")
  assert in1k.model.projector_bn and in1k.loss.la_R == 0.1 and in1k.loss.alpha == 2000
  tiny = parse(f"--flagfile={ROOT}/configs/tiny_imagenet.cfg", "--data_dir=/d")
  assert (tiny.model.depth, tiny.loss.la_mu, tiny.data.image_size) == (50, 0.1, 64)


def test_resolved_flagfile_round_trips(tmp_path):
  cfg = parse(f"--flagfile={ROOT}/configs/cifar100.cfg", "--workdir=/tmp/x", "--nol2_normalize")
  text = flags_lib.resolved_flagfile(FLAGS)
  path = str(tmp_path / "resolved_test.cfg")
  with open(path, "w") as fh:
    fh.write(text)
  assert parse(f"--flagfile={path}") == cfg


@pytest.mark.parametrize("args, message", [
    (["--projector=64-"], "--projector=64-: must be positive integers"),
    (["--la_R=1.5"], "--la_R=1.5: must be in [0, 1)"),
    (["--eps=-1"], "--eps=-1.0: must be > 0"),
    (["--batch_size=1"], "--batch_size=1"),
    (["--strategy=tpu"], "--strategy=tpu"),
    (["--hflip_prob=2"], "--hflip_prob=2.0: must be a probability"),
    (["--solarize_prob=0.1,x"], "--solarize_prob=0.1,x"),
    (["--dataset=folder"], "--data_dir=''"),
    (["--normalization=mnist"], "--normalization=mnist"),
    (["--loss_spike_factor=0.5"], "--loss_spike_factor=0.5: must be 0 (off) or > 1"),
    (["--loss_spike_window=2"], "--loss_spike_window=2: must be >= 5"),
    (["--data_service=local"], "--data_service=local: expected grpc://host:port"),
    (["--data_service=h:5050"], "--data_service=h:5050: needs image files its workers read"),
    (["--data_service=h:5050", "--dataset=images", "--data_dir=/x", "--cache"],
     "--data_service=h:5050: and --cache exclude each other"),
])
def test_bad_values_name_the_flag(args, message):
  with pytest.raises(errors.ConfigError) as info:
    parse(*args)
  assert message in str(info.value)


def test_a_data_service_address_gets_its_protocol():
  cfg = parse("--dataset=images", "--data_dir=/x", "--data_service=host:5050")
  assert cfg.data.data_service == "grpc://host:5050"


def test_resume_compatibility_names_the_changed_flag(tmp_path):
  from corinfomax_tf.training import workdir as workdir_lib
  wd = workdir_lib.Workdir(str(tmp_path), lock=False)
  saved = parse("--depth=18").to_dict()["model"]
  wd.check_compatible(saved, parse("--depth=18", "--lr=0.1").to_dict()["model"])
  with pytest.raises(errors.ConfigError, match="--depth=50: the workdir"):
    wd.check_compatible(saved, parse("--depth=50").to_dict()["model"])


def _resume_error(saved_args, args, saved_dict=None):
  """The message refusing to resume a run of `saved_args` with `args` (None: allowed)."""
  from corinfomax_tf.training import pretraining
  saved = saved_dict or {"resume": config.pretraining_resume_settings(parse(*saved_args))}
  try:
    pretraining.check_resume(pretraining.saved_resume_settings(saved),
                             config.pretraining_resume_settings(parse(*args)), "/w")
  except errors.ConfigError as e:
    return str(e)
  return None


@pytest.mark.parametrize("args, message", [
    (["--lr=0.1"], "--lr=0.1: the workdir /w was trained with --lr=0.5; use a new "
     "--workdir, or give the same value"),
    (["--seed=3"], "--seed=3: the workdir /w was trained with --seed=0"),
    (["--image_size=16"], "--image_size=16: the workdir /w was trained with --image_size=32"),
    (["--blur_prob=0.5"], "--blur_prob=0.5,0.5: the workdir /w was trained with "
     "--blur_prob=1.0,0.1"),
    (["--crop_min_scale=0.2"], "--crop_min_scale=0.2: the workdir"),
    (["--normalization=imagenet"], "--normalization=imagenet: the workdir /w was trained "
     "with --normalization=digits"),
    (["--shuffle_buffer=10"], "--shuffle_buffer=10: the workdir"),
    (["--alpha=10"], "--alpha=10.0: the workdir"),
    (["--projector=64-32"], "--projector=64-32: the workdir"),
    (["--steps_per_epoch=5"], "--steps_per_epoch=5: the workdir"),
    (["--train_split=test"], "--train_split=test: the workdir"),
    (["--online_probe"], "--online_probe=True: the workdir"),
    (["--epochs=5"], "--epochs=5: the workdir /w was trained with --epochs=1000; its "
     "learning-rate schedule was made for that length. Use a new --workdir, or the same "
     "value"),
    (["--epochs=1200"], "or the same value and --extend_epochs=200 to train 200 more"),
    (["--extend_epochs=3"], "--extend_epochs=3: the workdir /w was trained with "
     "--extend_epochs=2,1@0.1; give the same phases again"),
    (["--extend_epochs="], "--extend_epochs='': the workdir"),
])
def test_a_resume_that_would_change_the_run_names_the_flag_and_both_values(args, message):
  saved = ["--extend_epochs=2,1@0.1"] if "extend" in args[0] else []
  got = _resume_error(saved, [*saved, *args] if "extend" not in args[0] else args)
  assert got is not None and message in got and got.startswith(f"--{args[0][2:].split('=')[0]}"), got


def test_a_resume_may_change_what_does_not_change_the_run():
  for args in (["--workdir=/elsewhere"], ["--probe_epochs=3"], ["--keep_checkpoints=9"],
               ["--log_every_steps=2"], ["--monitor_every_steps=0"], ["--export"],
               ["--strategy=mirrored", "--num_cpu_devices=2"], ["--jit_compile"],
               ["--sync_bn=false"], ["--tfds_data_dir=/t"], ["--knn_every_epochs=5"]):
    assert _resume_error([], args) is None, args
  # Appending a phase trains longer; the same phases resume.
  assert _resume_error(["--extend_epochs=2"], ["--extend_epochs=2,3@0.01"]) is None
  assert _resume_error(["--extend_epochs=2"], ["--extend_epochs=2"]) is None


def test_an_older_workdir_without_resume_settings_is_compared_by_its_sections():
  saved = parse().to_dict()
  assert _resume_error(None, [], saved_dict=saved) is None
  assert _resume_error(None, ["--batch_size=64"], saved_dict=saved).startswith(
      "--batch_size=64: the workdir /w was trained with --batch_size=512")


@pytest.mark.parametrize("value", ["0", "x", "2@", "2@-1", "1.5"])
def test_a_bad_extension_phase_is_named(value):
  with pytest.raises(errors.ConfigError, match=r"--extend_epochs=.*is not N or N@LR"):
    parse(f"--extend_epochs={value}")


def test_the_extended_schedule_follows_the_base_then_each_phase():
  import math

  from corinfomax_tf.training import schedules
  _, base = schedules.reference_optimizer(0.5, 10, 2, min_lr=1e-3)
  _, extended = schedules.reference_optimizer(0.5, 10, 2, min_lr=1e-3,
                                              extensions=[(4, None), (5, 0.2)])
  assert extended.total_steps == 19
  rates = [float(extended(s)) for s in range(19)]
  assert rates[:10] == [float(base(s)) for s in range(10)]
  assert rates[10:14] == pytest.approx([1e-3] * 4)          # where the base ended
  want = [1e-3 + 0.5 * (0.2 - 1e-3) * (1 + math.cos(math.pi * k / 5)) for k in range(5)]
  assert rates[14:] == pytest.approx(want, rel=1e-6)
  lines = extended.describe(steps_per_epoch=1)
  assert lines[0].startswith("Extension 1: epochs 11-14 (steps 11-14), learning rate "
                             "constant 0.001 (--min_lr, where the schedule ends")
  assert lines[1] == ("Extension 2: epochs 15-19 (steps 15-19), learning rate a cosine "
                      "from 0.2 to 0.001")
  config_round_trip = schedules.ExtendedSchedule(**extended.get_config())
  assert [float(config_round_trip(s)) for s in range(19)] == rates


def test_the_training_images_are_identified_by_their_files(tmp_path):
  from corinfomax_tf.data import image_folder
  from corinfomax_tf.training import pretraining

  class Source:
    num_train = 2
    def __init__(self, paths):
      self.scans = (image_folder.FolderScan(str(tmp_path), paths, [-1] * len(paths), [],
                                            {}, {}),)
  a = pretraining.images_fingerprint(Source([str(tmp_path / "a.png"), str(tmp_path / "b.png")]))
  b = pretraining.images_fingerprint(Source([str(tmp_path / "a.png"), str(tmp_path / "c.png")]))
  assert a["count"] == b["count"] == 2 and a["files_sha256"] != b["files_sha256"]


@pytest.mark.slow
def test_linear_eval_flagfiles_parse():
  """The linear_eval command's own flags, parsed in a separate process (its flags
  share names with the pretraining command's)."""
  import sys
  script = (
      "import sys\n"
      "from absl import flags\n"
      "from corinfomax_tf.cli import linear_eval\n"
      "linear_eval.define_flags()\n"
      "for path in sys.argv[1:]:\n"
      "  flags.FLAGS.unparse_flags()\n"
      "  flags.FLAGS(['x', '--flagfile=' + path])\n"
      "  assert open(path).readline().startswith('# '), path\n"
      "  print(path, flags.FLAGS.epochs, flags.FLAGS.batch_size, flags.FLAGS.schedule)\n")
  result = helpers.run([sys.executable, "-c", script, *LINEAR_CONFIGS],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ))
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == len(LINEAR_CONFIGS) == 6
  assert all(" 100 256 " in line for line in lines)
  assert any(line.endswith("step") for line in lines)


def test_a_flag_set_twice_in_one_flagfile_is_a_contradiction(tmp_path):
  inner = tmp_path / "inner.cfg"
  inner.write_text("--batch_size=256\n--deterministic\n")
  outer = tmp_path / "outer.cfg"
  outer.write_text(f"# comment --batch_size=1\n--flagfile={inner}\n--lr=0.1\n"
                   "--nodeterministic\n")
  message = flags_lib.flagfile_contradiction(["prog", f"--flagfile={outer}"])
  assert message.startswith(f"--flagfile={outer}: --deterministic is set to 'true' at "
                            f"{inner}:2 and to 'false' at {outer}:4")
  # Same value twice, and the command line overriding the file, are fine.
  outer.write_text(f"--flagfile={inner}\n--batch_size=256\n")
  assert flags_lib.flagfile_contradiction(
      ["prog", f"--flagfile={outer}", "--batch_size=8"]) is None


@pytest.mark.parametrize("args, needle", [
    (["--data_dir=/x"], "--data_dir=/x: is read only with --dataset=folder or images (--dataset=digits)"),
    (["--num_cpu_devices=2"], "--num_cpu_devices=2: is read only with --strategy=mirrored"),
    (["--max_image_pixels=0"], "--max_image_pixels=0: must be >= 1"),
])
def test_flags_that_contradict_the_rest_are_named(args, needle):
  with pytest.raises(errors.ConfigError) as info:
    parse(f"--flagfile={ROOT}/configs/digits.cfg", *args)
  assert needle in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("module, prefix, expected", [
    ("finetune", "semisup_", 3),
    ("detect", "detection_", 2),
])
def test_downstream_flagfiles_parse_with_their_command(module, prefix, expected):
  """Each downstream command's flagfiles, parsed with its own flags (and the
  contradiction check) in a separate process."""
  import sys
  paths = sorted(glob.glob(os.path.join(ROOT, "configs", f"{prefix}*.cfg")))
  script = (
      "import sys\n"
      "from absl import flags\n"
      f"from corinfomax_tf.cli import {module} as m\n"
      "from corinfomax_tf import flags as flags_lib\n"
      "m.define_flags()\n"
      "for path in sys.argv[1:]:\n"
      "  assert flags_lib.flagfile_contradiction(['x', '--flagfile=' + path]) is None\n"
      "  flags.FLAGS.unparse_flags()\n"
      "  flags.FLAGS(['x', '--flagfile=' + path])\n"
      "  assert open(path).readline().startswith('# '), path\n"
      "  print(path, flags.FLAGS.epochs)\n")
  result = helpers.run([sys.executable, "-c", script, *paths],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ))
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(result.stdout.strip().splitlines()) == len(paths) == expected


def test_backbone_flags_are_checked(tmp_path):
  assert parse("--backbone=resnet50").model.depth == 50
  assert parse("--backbone=resnet50", "--depth=50").model.backbone == "resnet50"
  with pytest.raises(errors.ConfigError, match="--depth=18: contradicts --backbone=resnet50"):
    parse("--backbone=resnet50", "--depth=18")
  config = tmp_path / "vit.json"
  config.write_text('{"class_name": "ViTBackbone", "config": {}}')
  assert parse(f"--backbone_config={config}").model.backbone_config == str(config)
  with pytest.raises(errors.ConfigError, match="name two backbones"):
    parse(f"--backbone_config={config}", "--backbone=resnet18")
  with pytest.raises(errors.ConfigError, match="--backbone_config=.*: cannot be read"):
    parse(f"--backbone_config={tmp_path}/missing.json")


def test_every_pretraining_flag_is_a_config_setting_with_its_default():
  """One source of truth: a flag's default and help are its config field's."""
  import dataclasses
  values = flags_lib.defaults()
  fields = {field.name: field for cls in (config.DataConfig, config.ModelConfig,
                                          config.LossConfig, config.OptimConfig,
                                          config.TrainConfig)
            for field in dataclasses.fields(cls) if "help" in field.metadata}
  views = {"normalization", "crop_min_scale", "hflip_prob", "jitter_prob", "brightness",
           "contrast", "saturation", "hue", "grayscale_prob", "blur_prob", "solarize_prob"}
  assert set(values) == set(fields) | views
  for name, field in fields.items():
    default = field.default
    want = [str(v) for v in default] if isinstance(default, tuple) else default
    assert values[name] == want, name
    assert FLAGS[name].help.endswith(field.metadata["help"]), name


def test_field_checks_name_the_flag():
  for check, good, bad, requirement in [
      (">= 1", 1, 0, "must be >= 1"), ("> 0", 1e-9, 0, "must be > 0"),
      ("in [0, 1)", 0, 1, "must be in [0, 1)"), ("in (0, 1]", 1, 0, "must be in (0, 1]"),
      (">= 0; 0: all", 0, -1, "must be >= 0 (0: all)")]:
    ok, text = config._rule(check)
    assert ok(good) and not ok(bad) and text == requirement, check
  with pytest.raises(ValueError, match="Unknown check"):
    config.setting(1, "x", check="positive")
  with pytest.raises(errors.ConfigError, match=r"^--epochs=0: must be >= 1$"):
    parse("--epochs=0")
  with pytest.raises(errors.ConfigError, match=r"--batch_size=1: must be >= 2 \(covariance"):
    parse("--batch_size=1")


def test_the_backend_is_the_flag_else_keras_backend_and_jax_limits_are_one_line(monkeypatch):
  monkeypatch.delenv("KERAS_BACKEND", raising=False)
  assert parse("--workdir=w").train.backend == "tensorflow"
  monkeypatch.setenv("KERAS_BACKEND", "jax")
  assert parse("--workdir=w").train.backend == "jax"
  assert parse("--workdir=w", "--backend=tensorflow").train.backend == "tensorflow"
  for args, needle in [
      (["--backend=torch"], "--backend=torch: must be one of ('tensorflow', 'jax')"),
      (["--online_probe"], "--online_probe=True: the online probe trains on "
       "--backend=tensorflow only"),
      (["--mixed_precision=float16"], "--mixed_precision=float16: float16 loss scaling "
       "trains on --backend=tensorflow only"),
      (["--strategy=multi_worker"], "--strategy=multi_worker: several hosts train on "
       "--backend=tensorflow only (KERAS_BACKEND=jax)")]:
    with pytest.raises(errors.ConfigError) as info:
      parse("--workdir=w", *args)
    assert str(info.value).startswith(needle), str(info.value)
  assert parse("--workdir=w", "--mixed_precision=bfloat16").train.backend == "jax"
