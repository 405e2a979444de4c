"""Release downloads against a loopback HTTP server that serves the official release layout."""

import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from franca_hf.cli import main
from franca_hf.conversion.checkpoint import CheckpointError
from franca_hf.conversion.convert import convert_release
from franca_hf.conversion.releases import DownloadError, download_file, fetch_release_file, sha256_of

from ..conftest import RASA_CHECKPOINT, TEACHER_CHECKPOINT
from .fake_hub import FakeHub


class ReleaseServer:
    """Serves `files` (URL path -> bytes) on 127.0.0.1 with HTTP Range support, recording every request."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def _split_tar_parts(stem: str, payload: bytes) -> dict[str, bytes]:
    """A tar.gz holding `<stem>.pth`, cut into the three official parts."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"{stem}.pth")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    data = buffer.getvalue()
    third = len(data) // 3 + 1
    return {suffix: data[i * third : (i + 1) * third] for i, suffix in enumerate(("aa", "ab", "ac"))}


@pytest.fixture()
def server(tiny_releases):
    teacher, rasa = TEACHER_CHECKPOINT.read_bytes(), RASA_CHECKPOINT.read_bytes()
    files = {"/v1.0.0/franca_vitb14_In21K.pth": teacher, "/v1.0.0/franca_vitb14_In21K_rasa.pth": rasa}
    for suffix, part in _split_tar_parts("franca_vitg14_Laion600M", teacher).items():
        files[f"/v1.0.0/franca_vitg14_Laion600M_chunked.tar.gz.part_{suffix}"] = part
    running = ReleaseServer(files)
    yield running
    running.close()


def test_release_converts_once_then_comes_from_the_cache(server, tmp_path, reference):
    folder = convert_release("franca_vitb14_In21K", with_rasa=True, base_url=server.url, cache=tmp_path, progress=False)
    assert len(server.requests) == 2
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(reference["98x98.pixel_values"])
    assert (out.debiased_patch_tokens - reference["98x98.patch_rasa"]).abs().max() <= 1e-5
    source = model.config.source_checkpoint
    assert source["release"] == "franca_vitb14_In21K" and source["sha256"] == sha256_of(TEACHER_CHECKPOINT)
    assert "franca-research-only-rail-ams" in (folder / "README.md").read_text()
    again = convert_release("franca_vitb14_In21K", with_rasa=True, base_url=server.url, cache=tmp_path)
    assert again == folder and len(server.requests) == 2  # nothing downloaded or converted again


def test_split_vit_g_archive_is_joined_unpacked_and_converted(server, tmp_path, reference):
    path = fetch_release_file("franca_vitg14_Laion600M", base_url=server.url, cache=tmp_path, progress=False)
    assert path.read_bytes() == TEACHER_CHECKPOINT.read_bytes()
    assert sorted(p for p, _ in server.requests) == [
        f"/v1.0.0/franca_vitg14_Laion600M_chunked.tar.gz.part_{s}" for s in ("aa", "ab", "ac")
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == ["franca_vitg14_Laion600M.pth"]  # parts cleaned up

    folder = convert_release("franca_vitg14_Laion600M", base_url=server.url, cache=tmp_path, progress=False)
    assert len(server.requests) == 3  # the unpacked file was reused
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(reference["98x98.pixel_values"])
    assert (out.patch_tokens - reference["98x98.patch"]).abs().max() <= 1e-5
    source = model.config.source_checkpoint
    assert source["release"] == "franca_vitg14_Laion600M" and source["url"].endswith("_chunked.tar.gz.part_*")
    assert "laion/laion-coco" in (folder / "README.md").read_text()


def test_download_resumes_a_partial_file(server, tmp_path):
    data = server.files["/v1.0.0/franca_vitb14_In21K.pth"]
    target = tmp_path / "file.pth"
    Path(str(target) + ".partial").write_bytes(data[:1000])
    download_file(server.url + "/v1.0.0/franca_vitb14_In21K.pth", target, progress=False)
    assert target.read_bytes() == data
    assert server.requests == [("/v1.0.0/franca_vitb14_In21K.pth", "bytes=1000-")]


def test_download_errors_are_clear(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(server.url + "/v1.0.0/missing.pth", tmp_path / "missing.pth", progress=False)
    with pytest.raises(ValueError, match="Unknown Franca release 'franca_vitx14'"):
        fetch_release_file("franca_vitx14", cache=tmp_path)
    with pytest.raises(ValueError, match="has no published RASA head"):
        fetch_release_file("franca_vitb14_In21K_224", rasa=True, cache=tmp_path)


def test_convert_release_and_push_in_one_command(server, tmp_path, capsys, monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    try:
        code = main(
            [
                "convert",
                "--release",
                "franca_vitb14_In21K",
                "--with-rasa",
                "--base-url",
                server.url,
                "--cache-dir",
                str(tmp_path),
                "--push-to-hub",
                "valeo/franca-b",
                "--endpoint",
                hub.url,
            ]
        )
    finally:
        hub.close()
    assert code == 0, capsys.readouterr().err
    uploaded = hub.repos["valeo/franca-b"]["revisions"]["main"]
    assert {"model.safetensors", "modeling_franca.py", "README.md"} <= set(uploaded)
    assert "franca_vitb14_In21K" in uploaded["README.md"].decode() and "RASA sha256" in uploaded["README.md"].decode()


def test_cli_convert_release_and_errors(server, tmp_path, capsys):
    out = tmp_path / "out"
    command = [
        "convert",
        "--release",
        "franca_vitb14_In21K",
        "--base-url",
        server.url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    assert main(command) == 0 and (out / "model.safetensors").is_file()
    capsys.readouterr()
    downloads = len(server.requests)
    (tmp_path / "cache" / "downloads").rename(tmp_path / "cache" / "downloads-moved")  # a refusal downloads nothing
    assert main(command) == 2
    assert f"{out} already holds a model; pass overwrite=True to replace it. (--overwrite)" in capsys.readouterr().err
    rasa = ["convert", "--release", "franca_vitb14_In21K_224", "--with-rasa", "--base-url", server.url]
    assert main([*rasa, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "rasa")]) == 2
    assert "franca_vitb14_In21K_224 has no published RASA head; releases with one:" in capsys.readouterr().err
    assert len(server.requests) == downloads
    (tmp_path / "cache" / "downloads-moved").rename(tmp_path / "cache" / "downloads")
    assert main([*command, "--preset", "vit_base", "--overwrite"]) == 2
    assert "preset: only for local checkpoints; a release fixes its architecture. (--preset)" in capsys.readouterr().err

    # without --out the converted folder lives in the cache, is reused, and --overwrite converts it again
    cached = command[:-2]
    assert main(cached) == 0
    folder = Path(capsys.readouterr().out.split(" -> ")[-1].strip())
    (folder / "marker").write_text("from the first conversion")
    assert main(cached) == 0 and (folder / "marker").exists()
    assert main([*cached, "--overwrite", "--no-verify"]) == 0 and not (folder / "marker").exists()
    assert AutoModel.from_pretrained(folder).config.source_checkpoint.get("parity") is None  # not verified


def test_a_release_file_downloaded_by_hand_converts_as_that_release(tmp_path, tiny_releases):
    by_hand = tmp_path / "franca_vitl14_Laion600M.pth"
    by_hand.write_bytes(TEACHER_CHECKPOINT.read_bytes())
    assert main(["convert", str(by_hand), "--out", str(tmp_path / "out")]) == 0
    source = AutoModel.from_pretrained(tmp_path / "out").config.source_checkpoint
    assert source["release"] == "franca_vitl14_Laion600M" and source["dataset"] == "LAION-600M (LAION-COCO)"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: other" in card and "franca-research-only-rail-ams" in card


def test_a_file_named_like_a_release_is_that_release_only_if_its_architecture_is(tmp_path, caplog):
    """Provenance from what the weights are: a 128-wide 4-block checkpoint saved as the ViT-L release's file name
    converts, but as an ordinary checkpoint (no release name, data or research-only licence), with a warning."""
    by_hand = tmp_path / "franca_vitl14_Laion600M.pth"
    by_hand.write_bytes(TEACHER_CHECKPOINT.read_bytes())
    with caplog.at_level("WARNING", logger="franca_hf"):
        assert main(["convert", str(by_hand), "--out", str(tmp_path / "out")]) == 0
    assert "named like the official release franca_vitl14_Laion600M" in caplog.text
    assert "hidden_size 128 (expected 1024), num_hidden_layers 4 (expected 24)" in caplog.text
    source = AutoModel.from_pretrained(tmp_path / "out").config.source_checkpoint
    assert "release" not in source and "dataset" not in source and source["file"] == by_hand.name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: apache-2.0" in card and "franca-research-only-rail-ams" not in card


def test_a_downloaded_release_of_the_wrong_architecture_is_an_error(tmp_path):
    served = ReleaseServer({"/v1.0.0/franca_vitb14_In21K.pth": TEACHER_CHECKPOINT.read_bytes()})
    try:
        with pytest.raises(
            CheckpointError, match=r"does not hold franca_vitb14_In21K: hidden_size 128 \(expected 768\)"
        ):
            convert_release("franca_vitb14_In21K", base_url=served.url, cache=tmp_path, progress=False)
    finally:
        served.close()
    assert not (tmp_path / "converted" / "franca_vitb14_In21K" / "float32").exists()
