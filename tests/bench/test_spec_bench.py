"""Smoke test of `nimblelm bench spec --quick`."""

import json

from nimblelm.bench import spec


def test_spec_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "spec.json"
    code = spec.main(["--quick", "--prompts", "1", "--new-tokens", "10", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "vs nl AR" in printed and "tree/layer-skip" in printed
    data = json.loads(out.read_text())
    rows = {(r["prompt_set"], r["name"]): r for r in data["rows"]}
    for prompt_set in ("random", "repetitive"):
        for name in ("autoregressive", "sps/perfect", "sps/tiny", "tree/perfect", "tree/layer-skip",
                     "tree-auto/layer-skip", "lookup"):
            row = rows[(prompt_set, name)]
            assert row["tokens_match"] and row["tokens_per_s"] > 0 and row["tau"] >= 1
        assert rows[(prompt_set, "autoregressive")]["speedup_vs_nimblelm_ar"] == 1.0
        assert rows[(prompt_set, "sps/perfect")]["tau"] == 5.0  # 4 drafts + the bonus token, all accepted
        assert rows[(prompt_set, "tree-auto/layer-skip")]["chosen_tree_sizes_median"] >= 1
    hf_rows = [r for r in data["rows"] if r["engine"] == "transformers"]
    on_hf = [r for r in data["rows"] if r["engine"] == "nimblelm+hf"]  # nimblelm's engine, transformers target
    if data["notes"]:  # transformers or to_hf unavailable: the rows are skipped, with a note
        assert not hf_rows and not on_hf
    else:
        assert {r["name"] for r in hf_rows} == {"hf autoregressive", "hf assisted/perfect", "hf assisted/layer-skip",
                                                 "hf assisted/tiny", "hf lookup"}
        assert all(r["tokens_per_s"] > 0 and r["speedup_vs_hf_ar"] > 0 for r in hf_rows)
        assert {r["name"] for r in on_hf} == {"nl+hf sps/perfect", "nl+hf sps/layer-skip", "nl+hf sps/tiny",
                                               "nl+hf tree/layer-skip", "nl+hf lookup"}
        assert all(r["tokens_match"] and r["tokens_per_s"] > 0 and r["tau"] >= 1 for r in on_hf)
        for prompt_set in ("random", "repetitive"):
            assert rows[(prompt_set, "nl+hf sps/perfect")]["tau"] == 5.0
        assert "nl+hf tree/layer-skip" in printed


def test_bad_option_is_an_error(capsys):
    assert spec.main(["--quick", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
