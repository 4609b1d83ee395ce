"""Settings are validated at load: a bad value is one line naming the setting, never silently false, empty or ignored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kbsync.config import load_settings
from kbsync.errors import BadInput

REPO = Path(__file__).resolve().parent.parent


def load_toml(tmp_path: Path, text: str):
    f = tmp_path / "kbsync.toml"
    f.write_text(text)
    return load_settings(f, environ={})


@pytest.mark.parametrize("word", ["maybe", "", "2", "tru"])
def test_a_boolean_that_is_not_one_is_an_error_not_false(tmp_path, word):
    with pytest.raises(BadInput, match=rf"^regression.keep_applied must be true or false, not '{word}'$"):
        load_settings(environ={"KBSYNC_REGRESSION_KEEP_APPLIED": word})
    with pytest.raises(BadInput, match=rf"^regression.keep_applied must be true or false, not '{word}'$"):
        load_toml(tmp_path, f'[regression]\nkeep_applied = "{word}"\n')
    with pytest.raises(BadInput, match="^predict.chat must be true or false, not 1$"):
        load_toml(tmp_path, "[predict]\nchat = 1\n")


@pytest.mark.parametrize("word, value", [("true", True), ("Yes", True), (" on ", True), ("1", True),
                                         ("false", False), ("NO", False), ("off", False), ("0", False)])
def test_boolean_words_still_read(word, value):
    assert load_settings(environ={"KBSYNC_REGRESSION_KEEP_APPLIED": word}).regression.keep_applied is value


def test_an_empty_data_dir_is_an_error_not_the_current_directory(tmp_path):
    with pytest.raises(BadInput, match="^store.data_dir must be a non-empty string, not ''$"):
        load_settings(environ={"KBSYNC_STORE_DATA_DIR": ""})
    with pytest.raises(BadInput, match="^store.data_dir must be a non-empty string"):
        load_toml(tmp_path, '[store]\ndata_dir = "  "\n')


def test_unknown_sections_and_top_level_keys_are_errors(tmp_path):
    with pytest.raises(BadInput, match=r"^unknown settings section \[regresion\]; the sections are \[model\], "):
        load_toml(tmp_path, "[regresion]\nmax_kl = 0.5\n")
    with pytest.raises(BadInput, match=r"^unknown setting max_kl; the sections are "):
        load_toml(tmp_path, "max_kl = 0.5\n")
    with pytest.raises(BadInput, match=r"^setting regression must be a table \(\[regression\]\), not 3$"):
        load_toml(tmp_path, "regression = 3\n")


@pytest.mark.parametrize("toml, message", [
    ('[daemon]\npoll_interval = "soon"', "daemon.poll_interval must be a number, not 'soon'"),
    ("[daemon]\npoll_interval = -5", "daemon.poll_interval must be > 0 seconds and at most a year (31536000), not -5.0"),
    ("[daemon]\npoll_interval = nan", "daemon.poll_interval must be a number, not nan"),
    ("[daemon]\nstop_timeout = 1e300", "daemon.stop_timeout must be > 0 seconds and at most a year (31536000), not 1e+300"),
    ("[daemon]\nport = 70000", "daemon.port must be between 0 and 65535, not 70000"),
    ("[daemon]\nport = -1", "daemon.port must be between 0 and 65535, not -1"),
    ('[daemon]\nport = "80"', "daemon.port must be a whole number, not '80'"),
    ("[daemon]\nport = 80.5", "daemon.port must be a whole number, not 80.5"),
    ("[daemon]\nmethod_options = 3", "daemon.method_options must be a table ([daemon.method_options] in the config file), not 3"),
    ('[daemon]\nconsolidate_at = ["3:00"]', 'daemon.consolidate_at must be a list of UTC times of day "HH:MM" (00:00 to 23:59), e.g. ["03:00"], not [\'3:00\']'),
    ('[daemon]\nconsolidate_at = ["03:00", "24:00"]', 'daemon.consolidate_at must be a list of UTC times of day "HH:MM" (00:00 to 23:59), e.g. ["03:00"], not [\'03:00\', \'24:00\']'),
    ("[regression]\nretain_size = -1", "regression.retain_size must be between 0 and 1000000, not -1"),
    ('[regression]\nretain_size = "200"', "regression.retain_size must be a whole number, not '200'"),
    ("[regression]\nmin_unchanged = 1.5", "regression.min_unchanged must be between 0 and 1, not 1.5"),
    ("[regression]\nmin_unchanged = -0.1", "regression.min_unchanged must be between 0 and 1, not -0.1"),
    ("[regression]\nmax_kl = -1", "regression.max_kl must be >= 0, not -1.0"),
    ("[store]\nlock_timeout = -1", "store.lock_timeout must be >= 0 seconds and at most a year (31536000), not -1.0"),
    ("[store]\ndata_dir = 5", "store.data_dir must be a string, not 5"),
    ('[editor]\nanswer_style = "short"', "editor.answer_style must be one of auto, claim, bare, not 'short'"),
    ('[editor]\nmethod = ""', "editor.method must be a non-empty string, not ''"),
    ('[model]\nedit_layers = "a:b"', 'model.edit_layers must be a Python slice over the layers such as "-3:", "2:5" or "4", not \'a:b\''),
    ('[model]\nedit_layers = "1:2:3:4"', 'model.edit_layers must be a Python slice over the layers such as "-3:", "2:5" or "4", not \'1:2:3:4\''),
    ('[model]\nedit_layers = "::0"', 'model.edit_layers must be a Python slice over the layers such as "-3:", "2:5" or "4" (a step of 0 is not one), not \'::0\''),
    ('[model]\nedit_layers = "3:1"', 'model.edit_layers must be a Python slice over the layers such as "-3:", "2:5" or "4" that selects at least one layer, not \'3:1\''),
    ("[model]\nedit_modules = [1, 2]", "model.edit_modules must be a list of strings, not [1, 2]"),
    ('[kb]\nmode = "sometimes"', "kb.mode must be one of revision, modified, not 'sometimes'"),
    ("[kb]\nbatch_size = 0", "kb.batch_size must be between 1 and 10000, not 0"),
    ("[predict]\nmax_new_tokens = 100000", "predict.max_new_tokens must be between 1 and 4096, not 100000"),
    ("[serve]\nmax_prompts = 0", "serve.max_prompts must be between 1 and 10000, not 0"),
    ('[serve]\nmax_prompt_chars = "4k"', "serve.max_prompt_chars must be a whole number, not '4k'"),
    ("[serve]\nmax_target_chars = 1e6", "serve.max_target_chars must be a whole number, not 1000000.0"),
    ("[serve]\nmax_tokens = 5000", "serve.max_tokens must be between 1 and 4096, not 5000"),
    ("[serve]\nmax_prompt = 3", "unknown setting serve.max_prompt"),
])
def test_wrong_typed_or_out_of_range_values_are_one_line_errors_naming_the_setting(tmp_path, toml, message):
    with pytest.raises(BadInput) as info:
        load_toml(tmp_path, toml + "\n")
    assert str(info.value) == message


def test_valid_values_load_and_numbers_convert(tmp_path):
    s = load_toml(tmp_path, '[daemon]\npoll_interval = 2\nport = 65535\n[regression]\nmax_kl = inf\nmin_unchanged = 1\n'
                            '[model]\nedit_layers = "4"\n[editor.options]\nlr = 1e-3\nanything = "goes"\n'
                            '[daemon.method_options]\nmax_steps = 3\n')
    assert s.daemon.poll_interval == 2.0 and isinstance(s.daemon.poll_interval, float) and s.daemon.port == 65535
    assert s.regression.max_kl == float("inf") and s.regression.min_unchanged == 1.0  # inf: that limit is off
    assert s.editor.options == {"lr": 1e-3, "anything": "goes"} and s.daemon.method_options == {"max_steps": 3}
    defaults = load_settings(environ={}).serve
    assert (defaults.max_prompts, defaults.max_prompt_chars, defaults.max_target_chars, defaults.max_tokens) == (16, 4000, 200, 128)
    serve = load_settings(environ={"KBSYNC_SERVE_MAX_PROMPTS": "4", "KBSYNC_SERVE_MAX_TOKENS": " 32 "}).serve
    assert (serve.max_prompts, serve.max_tokens) == (4, 32)
    for spec in ("-3:", "2:5", "4", ":", "", "0:-1", "::2", "-1"):
        assert load_settings(environ={"KBSYNC_MODEL_EDIT_LAYERS": spec}).model.edit_layers == spec


def cli(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KBSYNC_")}
    return subprocess.run([sys.executable, "-m", "kbsync.cli", *args], cwd=cwd,
                          env={**base, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True, timeout=120)


def test_the_cli_says_which_setting_is_bad_in_one_line_and_writes_nothing(tmp_path):
    data = tmp_path / "data"
    cases = [
        ({"KBSYNC_STORE_DATA_DIR": ""}, ["history"], "kbsync: error: store.data_dir must be a non-empty string, not ''"),
        ({"KBSYNC_STORE_DATA_DIR": str(data), "KBSYNC_REGRESSION_KEEP_APPLIED": "maybe"}, ["history"],
         "kbsync: error: regression.keep_applied must be true or false, not 'maybe'"),
        ({"KBSYNC_STORE_DATA_DIR": str(data)}, ["history", "--data-dir", ""],
         "kbsync: error: store.data_dir must be a non-empty string, not ''"),
        ({"KBSYNC_STORE_DATA_DIR": str(data), "KBSYNC_DAEMON_PORT": "99999"}, ["daemon", "status"],
         "kbsync: error: daemon.port must be between 0 and 65535, not 99999"),
    ]
    for env, args, line in cases:
        proc = cli(env, *args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.strip() == line and "Traceback" not in proc.stderr
    cfg = tmp_path / "k.toml"
    cfg.write_text("[regression]\nkeep_aplied = false\n[sync]\nevery = 5\n")
    proc = cli({"KBSYNC_STORE_DATA_DIR": str(data)}, "kb", "status", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "kbsync: error: unknown setting regression.keep_aplied"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.toml"]  # no audit.db in the current directory
