"""`franca-hf index` / `search` are one library call each (`franca_hf.retrieval.index` / `search`): the call gives
what the command gives, every flag reaches its setting, and settings errors name the setting (the CLI adds the
flag)."""

import shutil
from dataclasses import asdict, fields

import pytest
import torch
import torch.nn.functional as F

from franca_hf import retrieval
from franca_hf.cli import main
from franca_hf.errors import UsageError
from franca_hf.features import ModelSpec
from franca_hf.retrieval import EmbeddingIndex
from franca_hf.retrieval_settings import AnnSettings, IndexSettings, SearchSettings

from .conftest import EXAMPLE_IMAGES


def test_index_and_search_calls_give_what_the_commands_give(tiny_folder, tmp_path, capsys, caplog):
    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLE_IMAGES, photos)
    (photos / "broken.jpg").write_bytes(b"not an image")
    model, images, workers = ModelSpec(str(tiny_folder)), str(photos), ["--num-workers", "0"]
    assert main(["index", images, "--model", str(tiny_folder), "--out", str(tmp_path / "cli"), *workers]) == 0
    captured = capsys.readouterr()
    built = retrieval.index(IndexSettings([images], str(tmp_path / "py"), model=model, num_workers=0))
    from_cli, from_call = EmbeddingIndex.load(tmp_path / "cli"), EmbeddingIndex.load(tmp_path / "py")
    assert from_call.ids == from_cli.ids == built.index.ids and len(from_call) == built.added == 4
    assert torch.equal(from_call.vectors, from_cli.vectors)
    assert f"indexed 4 images ({built.index.describe()}) {built.source} -> " in captured.out
    assert [where for where, _ in built.failed] == [str(photos / "broken.jpg")]
    assert captured.err.endswith("skipped 1 unreadable image (each named above)\n")
    assert f"Skipping unreadable image {photos / 'broken.jpg'}" in caplog.text

    query = str(photos / "rocket.jpg")
    search = ["search", query, "--index", str(tmp_path / "cli"), "--model", str(tiny_folder), "--funnel"]
    assert main([*search, "--dim", "32"]) == 0
    captured = capsys.readouterr()
    found = retrieval.search(SearchSettings([query], str(tmp_path / "py"), model, dim=32, funnel=True))
    assert (found.k, found.clamped, found.index_size, found.queries) == (4, True, 4, [query])
    assert "fewer than --k 10; showing all of them" in captured.err
    assert found.how == "funnel 8:4 > 16:4 > 32:4, first stage exact at 8 dims"
    assert sorted(found.ids[0]) == sorted(from_cli.ids) and found.scores.shape == (1, 4)
    ranked = enumerate(zip(found.scores[0].tolist(), found.ids[0], strict=True), start=1)
    rows = [f"  {rank:2d}. {score:.4f}  {id_}" for rank, (score, id_) in ranked]
    assert captured.out.splitlines() == [f"top-4 of 4 images ({found.how})", query, *rows]


def _capture(monkeypatch, name: str, result) -> list:
    """Replace the library function `retrieval.<name>` with one recording the settings it is called with."""
    calls = []
    monkeypatch.setattr(retrieval, name, lambda settings: calls.append(settings) or result)
    return calls


def test_every_index_and_search_flag_reaches_its_setting(monkeypatch, capsys):
    vectors = F.normalize(torch.randn(5, 16), dim=1)
    report = retrieval.IndexResult(EmbeddingIndex(vectors, ids=list("abcde")), 2, True, "from the features in f")
    calls = _capture(monkeypatch, "index", report)
    argv = ["index", "f", "g", "--model", "m", "--device", "cuda:1", "--dtype", "bfloat16", "--out", "o"]
    argv += ["--ann", "auto", "--hnsw-m", "8", "--ef-construction", "20", "--ef-search", "16", "--nlist", "4"]
    argv += ["--nprobe", "2", "--pq-bytes", "3", "--exact-below", "7", "--no-half-scan"]
    argv += ["--no-bound-scan", "--overwrite"]
    argv += ["--allow-other-model", "--batch-size", "3", "--num-workers", "1"]
    assert main(argv) == 0
    ann = AnnSettings(
        "auto",  # the one kind that takes every knob: it picks a kind by size
        hnsw_m=8,
        ef_construction=20,
        ef_search=16,
        nlist=4,
        nprobe=2,
        pq_bytes=3,
        exact_below=7,
        half_scan=False,
        bound_scan=False,
    )
    assert {key for key, value in asdict(ann).items() if value != getattr(AnnSettings(), key)} == {
        field.name for field in fields(AnnSettings)
    } - {"ann"}  # every other setting differs from its default: each flag is seen to arrive
    assert calls == [
        IndexSettings(
            ["f", "g"],
            "o",
            ModelSpec("m", "cuda:1", "bfloat16", False),
            ann,
            overwrite=True,
            allow_other_model=True,
            batch_size=3,
            num_workers=1,
        )
    ]
    assert capsys.readouterr().out == (
        f"indexed 5 images ({report.index.describe()}) appended 2 from the features in f -> o\n"
    )
    assert main(["index", "f", "--out", "o", "--ann", "ivfpq", "--nlist", "4"]) == 0
    assert calls[-1] == IndexSettings(["f"], "o", ann=AnnSettings("ivfpq", nlist=4))
    assert main(["index", "f", "--out", "o"]) == 0
    assert calls[-1] == IndexSettings(["f"], "o")  # no model, default first stage
    assert main(["index", "f", "--out", "o", "--append"]) == 0
    assert calls[-1] == IndexSettings(["f"], "o", append=True)  # an append keeps the index's first stage
    capsys.readouterr()

    found = retrieval.SearchResult(["q.jpg"], [["b", "a"]], torch.tensor([[0.5, 0.25]]), "exact", 2, True, 2)
    calls = _capture(monkeypatch, "search", found)
    argv = ["search", "q.jpg", "r", "--index", "i", "--model", "m", "--device", "cpu", "--int8", "--k", "3"]
    assert main([*argv, "--dim", "8", "--exact", "--allow-other-model"]) == 0
    assert calls == [SearchSettings(["q.jpg", "r"], "i", ModelSpec("m", "cpu", int8=True), 3, 8, False, True)]
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["top-2 of 2 images (exact)", "q.jpg", "   1. 0.5000  b", "   2. 0.2500  a"]
    assert captured.err == "note: the index holds 2 images, fewer than --k 3; showing all of them.\n"
    assert main([*argv, "--funnel"]) == 0 and calls[-1].funnel is True
    assert main(argv) == 0 and calls[-1].funnel is None and calls[-1].dim is None


@pytest.mark.parametrize(
    "make, setting, message",
    [
        (lambda: IndexSettings([], "o"), "images", "images is empty"),
        (lambda: IndexSettings(["f"], "o", batch_size=0), "batch_size", "batch_size must be at least 1; got 0."),
        (lambda: IndexSettings(["f"], "o", num_workers=-1), "num_workers", "num_workers must be at least 0; got -1."),
        (lambda: AnnSettings(ef_search=0), "ef_search", "ef_search must be at least 1; got 0."),
        (lambda: AnnSettings(ann="flat"), "ann", "ann='flat' is not an index kind"),
        (lambda: AnnSettings(nlist=-1), "nlist", r"nlist must be 0 \(automatic\) or positive; got -1."),
        (lambda: AnnSettings(exact_below=-1), "exact_below", "exact_below must be at least 0; got -1."),
        (
            lambda: IndexSettings(["f"], "o", ann=AnnSettings(ann="hnsw"), append=True),
            "ann",
            "An append keeps the index's own first stage; do not pass ann settings",
        ),
        (
            lambda: IndexSettings(["f"], "o", ann=AnnSettings(ann="hnsw", nlist=64)),
            "nlist",
            "nlist=64 applies to ann='ivfpq' only; with ann='hnsw' it would be ignored. Leave nlist out, or choose "
            "ann='ivfpq'.",
        ),
        (
            lambda: IndexSettings(["f"], "o", ann=AnnSettings(ann="none", ef_search=128)),
            "ef_search",
            "ef_search=128 applies to ann='hnsw' only; with ann='none' it would be ignored",
        ),
        (
            lambda: IndexSettings(["f"], "o", ann=AnnSettings(ann="ivfpq", exact_below=10)),
            "exact_below",
            "exact_below=10 applies to ann='auto' only; with ann='ivfpq' it would be ignored",
        ),
        (lambda: SearchSettings(["q"], "i", ModelSpec("m"), k=0), "k", "k must be at least 1; got 0."),
    ],
)
def test_settings_errors_name_the_setting(make, setting, message):
    with pytest.raises(UsageError, match=message) as error:
        make()
    assert error.value.setting == setting


def test_command_errors_name_the_setting_and_the_cli_its_flag(tiny_folder, tmp_path, capsys):
    assert main(["index", "photos", "--out", "o", "--hnsw-m", "0"]) == 2
    assert capsys.readouterr().err == "franca-hf index: error: hnsw_m must be at least 1; got 0. (--hnsw-m)\n"
    assert main(["index", "features", "--out", "o", "--append", "--nprobe", "8"]) == 2  # before opening anything
    assert capsys.readouterr().err.startswith("franca-hf index: error: An append keeps the index's own first stage")
    assert main(["index", "photos", "--out", "o", "--ann", "none", "--nlist", "64"]) == 2
    assert capsys.readouterr().err == (
        "franca-hf index: error: nlist=64 applies to ann='ivfpq' only; with ann='none' it would be ignored. Leave "
        "nlist out, or choose ann='ivfpq'. (--nlist)\n"
    )
    images = IndexSettings([str(EXAMPLE_IMAGES)], str(tmp_path / "o"), ModelSpec(str(tiny_folder)), append=True)
    with pytest.raises(UsageError, match="append adds the new shards of an extract folder") as error:
        retrieval.index(images)  # refused before the model loads
    assert error.value.setting == "append"
    with pytest.raises(UsageError, match="model is required to embed images") as error:
        retrieval.index(IndexSettings([str(EXAMPLE_IMAGES)], str(tmp_path / "o")))
    assert error.value.setting == "model"
    assert not (tmp_path / "o").exists()


def test_search_shows_only_the_rows_an_ann_first_stage_found(tiny_folder, tmp_path, capsys):
    """IVF-PQ probing 1 of 16 cells finds fewer rows than the 400 asked for: `search` and the command list those
    rows once each (the padding, index -1, is not an image), and the scores past them are -inf."""
    database = F.normalize(torch.randn(3000, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    settings = AnnSettings(ann="ivfpq", nlist=16, nprobe=1, pq_bytes=4)
    EmbeddingIndex(database, dims=[8, 16, 32, 64, 128], settings=settings).save(tmp_path / "index")
    query = str(EXAMPLE_IMAGES / "coffee.jpg")
    asked = SearchSettings([query], str(tmp_path / "index"), ModelSpec(str(tiny_folder)), k=400, funnel=True)
    result = retrieval.search(asked)
    found = len(result.ids[0])
    assert 0 < found < 400 and len(set(result.ids[0])) == found
    assert torch.isfinite(result.scores[0, :found]).all() and (result.scores[0, found:] == -torch.inf).all()
    command = ["search", query, "--index", str(tmp_path / "index"), "--model", str(tiny_folder), "--k", "400"]
    assert main([*command, "--funnel"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 + found and printed[-2].endswith(result.ids[0][-1])
    assert (
        printed[-1] == f"  (only {found}: the index's approximate first stage found no more; --exact reads every row)"
    )
