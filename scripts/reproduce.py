"""Run a named improvement study and write its table into BENCHMARKS.md.

  python scripts/reproduce.py --table levers-digits
  XLA_FLAGS=--xla_force_host_platform_device_count=1 python scripts/reproduce.py \
      --table levers-digits --study_dir runs/studies/levers-digits

Trains the baseline, each lever alone and the levers combined, for several
seeds each, in STUDY_DIR/ROW/seed_N. Re-running the same command skips the runs
that finished and resumes the ones that were interrupted. It then prints the
table (mean ± standard deviation over seeds, difference to the baseline in
points, train time, parameter count), writes STUDY_DIR/table.md, table.json
and table.png, and replaces the table's section of BENCHMARKS.md (between its
markers) with the table, the command, the hardware, the package versions and
the date. `--list` prints the tables and their rows.
"""

import json
import os
import shlex
import shutil
import sys
import time

from jaxbase import hostdevices

hostdevices.use_cpu_cores_as_devices()  # Before jax is imported.
hostdevices.keep_freed_memory()

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402

from jaxbase import cli, environment, logs, study, study_tables  # noqa: E402

_TABLE = flags.DEFINE_string("table", None, "Study name; --list prints them.")
_LIST = flags.DEFINE_bool("list", False, "Print the tables, their rows and overrides, then exit.")
_STUDY_DIR = flags.DEFINE_string(
    "study_dir", None, "Folder for the study's runs (default: runs/studies/TABLE)."
)
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per row (default: the table's own).")
_ROWS = flags.DEFINE_list("rows", [], "Run only these rows (the baseline always runs).")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "KEY=VALUE applied to every run, e.g. data.path=/data/cifar10-jpeg.tar.gz."
)
_BENCHMARKS = flags.DEFINE_string(
    "benchmarks",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md"),
    "The Markdown file whose section for the table is replaced; empty to skip.",
)


def _parse_value(text: str):
  """Reads a command-line value as JSON when it parses (numbers, booleans), else as a string."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def _print_tables() -> None:
  for name, table in study_tables.TABLES.items():
    print(f"{name}: {table.seeds} seeds per row; budget: {table.budget}")
    for run in table.pretraining:
      print(f"  pretraining {run.name!r}: {run.description}")
    for row, overrides in table.rows():
      settings = ", ".join(f"{k}={v!r}" for k, v in overrides.items()) or "(the baseline config)"
      print(f"  {row}: {settings}")


@cli.report_input_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logs.show_own_info_only()
  if _LIST.value:
    _print_tables()
    return
  if _TABLE.value is None:
    raise app.UsageError("pass --table NAME; --list prints the tables")
  try:
    table = study_tables.get(_TABLE.value)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  study_dir = _STUDY_DIR.value or os.path.join("runs", "studies", table.name)

  extra = {}
  for pair in _OVERRIDES.value:
    key, sep, value = pair.partition("=")
    if not sep:
      raise app.UsageError(f"--override expects KEY=VALUE, got {pair!r}")
    extra[key] = _parse_value(value)

  environment.enable_compilation_cache()
  start = time.time()
  results = study.run_table(
      table, study_dir, seeds=_SEEDS.value, extra_overrides=extra, only_rows=_ROWS.value
  )
  wall_minutes = (time.time() - start) / 60
  summaries = study.summarize(results)
  markdown = study.markdown_table(summaries)
  print(markdown)

  os.makedirs(study_dir, exist_ok=True)
  chart = study.plot_bars(summaries, os.path.join(study_dir, "table.png"), table.name)
  with open(os.path.join(study_dir, "table.md"), "w") as f:
    f.write(markdown + "\n")
  with open(os.path.join(study_dir, "table.json"), "w") as f:
    json.dump({"table": table.name, "runs": results}, f, indent=2)
  logging.info("Wrote %s and the table files in %s", chart, study_dir)

  if _BENCHMARKS.value:
    # The chart goes next to BENCHMARKS.md, so the page can show it.
    chart_name = os.path.join("docs", "studies", f"{table.name}.png")
    chart_copy = os.path.join(os.path.dirname(os.path.abspath(_BENCHMARKS.value)), chart_name)
    os.makedirs(os.path.dirname(chart_copy), exist_ok=True)
    shutil.copyfile(chart, chart_copy)
    flags_env = os.environ.get("XLA_FLAGS", "")
    command = "python scripts/reproduce.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if flags_env:
      command = f"XLA_FLAGS={shlex.quote(flags_env)} {command}"
    robust = ""
    if table.robust_attack is not None:
      attack, eps = table.robust_attack
      examples = (
          f"{table.robust_examples:,} test images drawn with a fixed seed"
          if table.robust_examples
          else "the whole test set"
      )
      robust = f" Robust top-1: {attack} at L-inf eps {eps:.4g} over {examples}."
    # Overrides, a subset of rows or fewer seeds are listed next to the
    # budget, so a partial run is not mistaken for the full study.
    changes = ""
    if extra:
      changes += (
          " Overrides on every run: " + ", ".join(f"{k}={v!r}" for k, v in extra.items()) + "."
      )
    if _ROWS.value:
      changes += f" Only these rows of the table: baseline, {', '.join(_ROWS.value)}."
    seeds_run = len(next(iter(results.values())))
    if seeds_run < table.seeds:
      changes += f" {seeds_run} seed(s) per row instead of the table's {table.seeds}."
    if changes:
      logging.warning("The table does not follow its own budget:%s", changes)
    section = (
        f"### {table.name}\n\n"
        f"{markdown}\n\n"
        f"Command: `{command}`. Budget per row: {table.budget}.{changes} Mean ± standard deviation "
        f"over seeds 0 to {seeds_run - 1}; delta in points against "
        f"the baseline.{robust} Devices: {jax.device_count()} ({jax.default_backend()}). "
        f"This invocation took {wall_minutes:.1f} min of wall time, runs read back from "
        f"earlier invocations included. Environment: {environment.describe()}.\n\n"
        f"![{table.name}]({chart_name})"
    )
    study.update_benchmarks(_BENCHMARKS.value, table.name, section)
    logging.info("Updated the %s section of %s", table.name, _BENCHMARKS.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
