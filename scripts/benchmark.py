"""Measure train-step and eval-step speed of a model on the current backend.

  python scripts/benchmark.py --model resnet20 --batch_size 128
  python scripts/benchmark.py --model resnet20 --batch_size 128 --adversarial pgd --attack_steps 7
  python scripts/benchmark.py --model resnet20,resnet56 --batch_size 64,128,256 --compare_torch

Runs the library's own per-replica steps through the data-parallel launcher on
random data of the given image shape, after warmup steps, and reports compile
time, median step time, images per second, and, with --adversarial, the cost
ratio of the adversarial step to a clean step (ideally about k + 1 for PGD-k,
because each attack step is one forward and backward pass). Results are printed
as a table and written as JSON with --output.

Comma-separated --model and --batch_size lists measure every combination. With
--compare_torch, the same run also times the PyTorch twin of each CIFAR ResNet
(`jaxbase.torch_reference`, SGD with Nesterov momentum and weight decay, on
all CPU threads) in NCHW and channels-last layouts, and reports jax images per
second over those of the faster PyTorch layout. --output then contains one
JSON object per combination, as a list when there are several. --repeats N
times N rounds of train steps, alternating between jax and each PyTorch layout
after one compilation, and adds the rounds and their medians ("rounds",
"rounds_median").

Every run also reports the model FLOPs of a train step per image (3 times the
forward convolutions and matrix products, `jaxbase.flops`) and the TFLOP/s they
amount to, and with --peak_tflops (one device's peak for --dtype) the model-FLOP
utilization, e.g. for ResNet-50 in bfloat16 on a GPU:

  python scripts/benchmark.py --model resnet50 --image_shape 224,224,3 --num_classes 1000 \
      --dtype bfloat16 --batch_size 256 --peak_tflops PEAK

On the CPU backend the convolutions run on oneDNN (`jaxbase.kernels.conv`;
--conv_impl=xla times XLA's own kernels), and the script keeps freed memory in
the process (`hostdevices.keep_freed_memory`), as the training scripts do.
"""

import functools
import itertools
import json
import math
import os
import statistics
import time

from jaxbase import hostdevices

hostdevices.use_cpu_cores_as_devices()  # Before jax is imported.
_KEEPS_FREED_MEMORY = hostdevices.keep_freed_memory()

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxbase import flops, models, optim  # noqa: E402
from jaxbase.kernels import conv as kernel_conv  # noqa: E402
from jaxbase.train import adversarial as adversarial_lib  # noqa: E402
from jaxbase.train import steps as steps_lib  # noqa: E402
from jaxbase.train.parallel import DataParallel  # noqa: E402
from jaxbase.train.state import create_train_state  # noqa: E402

_MODEL = flags.DEFINE_list(
    "model", ["resnet20"], "Model names (see jaxbase.models.MODELS), comma-separated."
)
_BATCH = flags.DEFINE_list("batch_size", ["128"], "Global batch sizes, comma-separated.")
_IMAGE = flags.DEFINE_list("image_shape", ["32", "32", "3"], "Height, width, channels.")
_CLASSES = flags.DEFINE_integer("num_classes", 10, "Number of classes.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(models.DTYPES), "Compute dtype.")
_CONV_IMPL = flags.DEFINE_enum(
    "conv_impl",
    "auto",
    list(kernel_conv.IMPLS),
    "Convolution kernels: auto (oneDNN on CPU when available), onednn or xla.",
)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_PARALLEL = flags.DEFINE_enum("parallel", "shard_map", ["shard_map", "pmap"], "Launcher.")
_ADVERSARIAL = flags.DEFINE_enum(
    "adversarial", "none", list(adversarial_lib.METHODS), "Adversarial training method to time."
)
_ATTACK_STEPS = flags.DEFINE_integer("attack_steps", 7, "Attack steps for pgd and trades.")
_REPEATS = flags.DEFINE_integer(
    "repeats",
    1,
    "Rounds of timed train steps per combination: jax, then torch with --compare_torch, in "
    "turn, and their medians. Background load on a shared machine moves single runs by 30%.",
)
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops",
    None,
    "Peak TFLOP/s of one device for --dtype, from its datasheet; adds the model-FLOP "
    "utilization of the clean train step.",
)
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON to this file.")
_COMPARE_TORCH = flags.DEFINE_bool(
    "compare_torch",
    False,
    "Also time the PyTorch twin of the model (CIFAR ResNets only; needs the torch extra).",
)
_TORCH_LAYOUTS = flags.DEFINE_list(
    "torch_layouts",
    ["nchw", "channels_last"],
    "PyTorch memory layouts to time with --compare_torch: nchw, channels_last.",
)


def _time_steps(step_fn, state, batches, count):
  """Runs `count` steps and returns (state, per-step seconds)."""
  times = []
  for i in range(count):
    start = time.perf_counter()
    state, metrics = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, times


def measure_train(model, launcher, batches, adversarial_config, example):
  """Compiles and times the train step; returns compile seconds and step seconds."""
  optimizer, schedule = optim.build(
      ml_collections.ConfigDict(
          {
              "name": "sgd",
              "lr": 0.1,
              "momentum": 0.9,
              "nesterov": True,
              "weight_decay": 5e-4,
              "schedule": "constant",
          }
      ),
      steps_per_epoch=100,
      total_steps=1000,
  )
  state = launcher.replicate(create_train_state(model, optimizer, example, seed=0))
  train_step = launcher.compile_train_step(
      steps_lib.make_train_step(
          model, optimizer, schedule=schedule, adversarial=adversarial_config, steps_per_epoch=100
      )
  )
  state, compile_times = _time_steps(train_step, state, batches, 1)
  state, _ = _time_steps(train_step, state, batches, _WARMUP.value)
  state, times = _time_steps(train_step, state, batches, _STEPS.value)
  return compile_times[0], times, state, train_step


def train_flops_per_image(model, example):
  """Returns the model FLOPs of one image's train step: 3 x its forward FLOPs.

  The backward pass is taken to cost twice the forward pass. The convolutions and matrix products are counted from the model's program
  (`jaxbase.flops`), with XLA's convolutions in place of oneDNN's, which the
  count cannot see.
  """
  if "conv_impl" in type(model).__dataclass_fields__:
    model = model.clone(conv_impl="xla")
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), example, train=False))
  forward = flops.count_flops(lambda v, x: model.apply(v, x, train=False), variables, example)
  return 3 * forward // example.shape[0]


def utilization(flops_per_image, images_per_second, num_devices):
  """Returns the achieved model TFLOP/s and, with --peak_tflops, the model-FLOP utilization."""
  achieved = flops_per_image * images_per_second / 1e12
  out = {"model_tflops_per_second": achieved}
  if _PEAK_TFLOPS.value:
    out["model_flop_utilization"] = achieved / (_PEAK_TFLOPS.value * num_devices)
  return out


def benchmark_jax(model_name, batch_size, launcher):
  """Times the train steps (clean and adversarial) and the eval step of one model and batch size."""
  launcher.check_batch_size(batch_size, "--batch_size")
  height, width, channels = (int(v) for v in _IMAGE.value)
  model_config = ml_collections.ConfigDict(
      {
          "name": model_name,
          "dtype": _DTYPE.value,
          "mean": (0.5,) * channels,
          "std": (0.25,) * channels,
          "conv_impl": _CONV_IMPL.value,
      }
  )
  model = models.build_model(model_config, _CLASSES.value)
  example = jnp.zeros((1, height, width, channels), jnp.float32)
  rng = np.random.default_rng(0)
  batches = [
      launcher.shard_batch(
          {
              "images": rng.integers(0, 256, (batch_size, height, width, channels), dtype=np.uint8),
              "labels": rng.integers(0, _CLASSES.value, batch_size).astype(np.int32),
          }
      )
      for _ in range(2)
  ]

  results = {
      "model": model_name,
      "batch_size": batch_size,
      "image_shape": [height, width, channels],
      "dtype": _DTYPE.value,
      "devices": launcher.num_devices,
      "parallel": launcher.mode,
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "conv_kernels": kernel_conv.resolve(_CONV_IMPL.value, models.DTYPES[_DTYPE.value]),
      "malloc_keeps_freed_memory": _KEEPS_FREED_MEMORY,
      "timed_steps": _STEPS.value,
  }
  results["model_train_flops_per_image"] = train_flops_per_image(model, example)
  configs = {"clean": None}
  if _ADVERSARIAL.value != "none":
    adversarial = adversarial_lib.default_config()
    adversarial.method = _ADVERSARIAL.value
    adversarial.num_steps = _ATTACK_STEPS.value
    configs[_ADVERSARIAL.value] = adversarial

  for label, adversarial_config in configs.items():
    compile_seconds, times, state, train_step = measure_train(
        model, launcher, batches, adversarial_config, example
    )
    if label == "clean":
      clean = {"state": state, "step": train_step}
    median = statistics.median(times)
    results[f"train_{label}"] = {
        "compile_seconds": compile_seconds,
        "median_step_seconds": median,
        "images_per_second": batch_size / median,
    }
    if label == "clean":
      results["train_clean"].update(
          utilization(
              results["model_train_flops_per_image"], batch_size / median, launcher.num_devices
          )
      )

  eval_step = launcher.compile_eval_step(steps_lib.make_eval_step(model))
  eval_batch = dict(batches[0])
  eval_batch["mask"] = launcher.shard_batch({"mask": np.ones(batch_size, np.float32)})["mask"]
  eval_times = []
  # The first call compiles, so it is never timed, whatever --warmup is.
  for i in range(1 + _WARMUP.value + _STEPS.value):
    start = time.perf_counter()
    jax.block_until_ready(eval_step(state, eval_batch))
    if i > _WARMUP.value:
      eval_times.append(time.perf_counter() - start)
  results["eval"] = {
      "median_step_seconds": statistics.median(eval_times),
      "images_per_second": batch_size / statistics.median(eval_times),
  }
  if _ADVERSARIAL.value != "none":
    clean_seconds = results["train_clean"]["median_step_seconds"]
    attacked = results[f"train_{_ADVERSARIAL.value}"]["median_step_seconds"]
    results["adversarial_cost_ratio"] = attacked / clean_seconds
    ideal = {"pgd": _ATTACK_STEPS.value + 1, "trades": _ATTACK_STEPS.value + 2, "fgsm_rs": 2}
    results["ideal_cost_ratio"] = ideal[_ADVERSARIAL.value]

  def time_clean_steps():
    """Times _STEPS more clean train steps and returns their median seconds."""
    clean["state"], times = _time_steps(clean["step"], clean["state"], batches, _STEPS.value)
    return statistics.median(times)

  return results, time_clean_steps


def benchmark_torch(results):
  """Adds PyTorch train-step timings of the same model and batch to `results`, one per layout.

  Returns:
    {layout: function that times _STEPS more steps and returns their median seconds}.
  """
  from jaxbase import torch_reference  # Imported here: torch is an optional extra.
  import torch

  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  results["torch"] = {"version": torch.__version__, "device": device, "threads": threads}
  timers = {}
  for layout in _TORCH_LAYOUTS.value:
    timed = torch_reference.train_step_timer(
        results["model"],
        batch_size=results["batch_size"],
        image_shape=results["image_shape"],
        num_classes=_CLASSES.value,
        channels_last=layout == "channels_last",
        device=device,
    )
    first = timed(0)
    for index in range(_WARMUP.value):
      timed(index)
    timers[layout] = functools.partial(_median_torch_step, timed)
    median = timers[layout]()
    results["torch"][layout] = {
        "first_step_seconds": first,
        "median_step_seconds": median,
        "images_per_second": results["batch_size"] / median,
    }
  fastest = max(_TORCH_LAYOUTS.value, key=lambda k: results["torch"][k]["images_per_second"])
  results["torch"]["fastest_layout"] = fastest
  results["jax_over_torch"] = (
      results["train_clean"]["images_per_second"] / results["torch"][fastest]["images_per_second"]
  )
  return timers


def _median_torch_step(timed):
  return statistics.median(timed(index) for index in range(_STEPS.value))


def measure_rounds(results, time_jax, torch_timers):
  """Adds `results["rounds"]`: _REPEATS rounds of jax steps, then torch steps per layout.

  Round 1 is the measurement already in `results`. Each later round times
  _STEPS steps of every framework in turn, seconds apart, so that background
  load on a shared machine hits both alike and the per-round ratio cancels it.
  """
  batch_size = results["batch_size"]
  first = {"jax_images_per_second": results["train_clean"]["images_per_second"]}
  for layout in torch_timers:
    first[f"torch_{layout}_images_per_second"] = results["torch"][layout]["images_per_second"]
  rounds = [first]
  for _ in range(_REPEATS.value - 1):
    entry = {"jax_images_per_second": batch_size / time_jax()}
    for layout, timer in torch_timers.items():
      entry[f"torch_{layout}_images_per_second"] = batch_size / timer()
    rounds.append(entry)
  for entry in rounds:
    if torch_timers:
      best = max(entry[f"torch_{layout}_images_per_second"] for layout in torch_timers)
      entry["jax_over_torch"] = entry["jax_images_per_second"] / best
  results["rounds"] = rounds
  results["rounds_median"] = {
      key: statistics.median(entry[key] for entry in rounds) for key in rounds[0]
  }


def print_rounds(results):
  """Prints the per-round throughputs and their medians."""
  keys = list(results["rounds_median"])
  ratio = ", and jax / best torch" if "jax_over_torch" in keys else ""
  print(f"{len(results['rounds'])} rounds of train steps: images per second{ratio}")
  print("".join(f"{key.removesuffix('_images_per_second'):>24}" for key in keys))
  for index, entry in enumerate(results["rounds"], start=1):
    print("".join(f"{entry[key]:>24.2f}" for key in keys) + f"  round {index}")
  print("".join(f"{results['rounds_median'][key]:>24.2f}" for key in keys) + "  median")


def print_results(results):
  """Prints one combination's timings as a table."""
  print(
      f"{results['model']}, batch {results['batch_size']}, {results['dtype']}, "
      f"{results['devices']} {results['backend']} device(s), {results['conv_kernels']} "
      f"convolutions, median of {_STEPS.value} steps"
  )
  print(f"{'step':<26}{'first s':>10}{'step ms':>10}{'img/s':>10}")
  for key, value in results.items():
    if key.startswith("train_"):
      print(
          f"{key:<26}{value['compile_seconds']:>10.1f}{value['median_step_seconds'] * 1e3:>10.1f}"
          f"{value['images_per_second']:>10.0f}"
      )
  print(
      f"{'eval':<26}{'':>10}{results['eval']['median_step_seconds'] * 1e3:>10.1f}"
      f"{results['eval']['images_per_second']:>10.0f}"
  )
  for layout in _TORCH_LAYOUTS.value if "torch" in results else ():
    value = results["torch"][layout]
    print(
        f"{'torch train ' + layout:<26}{value['first_step_seconds']:>10.1f}"
        f"{value['median_step_seconds'] * 1e3:>10.1f}{value['images_per_second']:>10.0f}"
    )
  if "jax_over_torch" in results:
    print(
        f"jax / torch train images per second: {results['jax_over_torch']:.2f} "
        f"(torch {results['torch']['fastest_layout']}, {results['torch']['threads']} threads)"
    )
  clean = results["train_clean"]
  line = (
      f"train model FLOPs: {results['model_train_flops_per_image'] / 1e9:.3f} GFLOP per image, "
      f"{clean['model_tflops_per_second']:.3f} TFLOP/s"
  )
  if "model_flop_utilization" in clean:
    line += f", {clean['model_flop_utilization']:.1%} of {_PEAK_TFLOPS.value:g} TFLOP/s per device"
  print(line)
  if "adversarial_cost_ratio" in results:
    print(
        f"adversarial step / clean step: {results['adversarial_cost_ratio']:.2f} "
        f"(ideal about {results['ideal_cost_ratio']})"
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  batch_sizes = [int(b) for b in _BATCH.value]
  unknown = [m for m in _MODEL.value if m not in models.MODELS]
  if unknown:
    raise app.UsageError(f"unknown --model {', '.join(unknown)}; known: {', '.join(models.MODELS)}")
  unknown = [k for k in _TORCH_LAYOUTS.value if k not in ("nchw", "channels_last")]
  if unknown or not _TORCH_LAYOUTS.value:
    raise app.UsageError(
        f"invalid --torch_layouts {','.join(_TORCH_LAYOUTS.value)}; use nchw, channels_last or both"
    )
  if _COMPARE_TORCH.value:
    try:
      from jaxbase import torch_reference
    except ImportError as error:
      raise app.UsageError(
          f"--compare_torch needs PyTorch ({error}); install it with pip install -e '.[torch]'"
      ) from error
    unsupported = [m for m in _MODEL.value if m not in torch_reference.supported_models()]
    if unsupported:
      raise app.UsageError(
          f"--compare_torch has no PyTorch twin of {', '.join(unsupported)}; "
          f"supported: {', '.join(torch_reference.supported_models())}"
      )
  launcher = DataParallel(_PARALLEL.value)
  for batch_size in batch_sizes:
    launcher.check_batch_size(batch_size, "--batch_size")

  peak = _PEAK_TFLOPS.value
  if peak is not None and not (math.isfinite(peak) and peak > 0):
    raise app.UsageError(f"--peak_tflops={peak} must be a positive finite number")
  if _STEPS.value < 1:
    raise app.UsageError(f"--steps={_STEPS.value} must be at least 1")
  if _WARMUP.value < 0:
    raise app.UsageError(f"--warmup={_WARMUP.value} must be at least 0")
  if _REPEATS.value < 1:
    raise app.UsageError(f"--repeats={_REPEATS.value} must be at least 1")
  all_results = []
  for model_name, batch_size in itertools.product(_MODEL.value, batch_sizes):
    results, time_jax = benchmark_jax(model_name, batch_size, launcher)
    torch_timers = benchmark_torch(results) if _COMPARE_TORCH.value else {}
    print_results(results)
    if _REPEATS.value > 1:
      measure_rounds(results, time_jax, torch_timers)
      print_rounds(results)
    all_results.append(results)

  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(all_results[0] if len(all_results) == 1 else all_results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
