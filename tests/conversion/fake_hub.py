"""A loopback stand-in for the parts of the Hugging Face Hub HTTP API that `upload_folder` uses: repo creation,
branches, the preupload check (every file is answered "regular", so contents travel in the commit) and the NDJSON
commit endpoint. It records the repos, their files per revision and every request."""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "revisions": {name: {path: bytes}}}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.validated: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = (
                        f"{request['organization']}/{request['name']}"
                        if request.get("organization")
                        else request["name"]
                    )
                    private = request.get("visibility", "private" if request.get("private") else "public") == "private"
                    hub.repos.setdefault(repo_id, {"private": private, "revisions": {"main": {}}})
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
                if path == "/api/validate-yaml":  # the Hub checks a README's metadata block before a commit
                    content = json.loads(body)["content"]
                    try:
                        metadata = yaml.safe_load(content.split("---")[1])
                        assert isinstance(metadata, dict)
                    except Exception as error:  # noqa: BLE001 (reported to the client, as the Hub does)
                        return self._reply(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
                    hub.validated.append(metadata)
                    return self._reply(200, {"errors": [], "warnings": []})
                parts = path.split("/")  # /api/models/<ns>/<name>/<action>/<revision>
                if len(parts) < 7 or parts[2] != "models":
                    return self._reply(404, {"error": f"the fake Hub does not serve {path}"})
                repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                revisions = hub.repos[repo_id]["revisions"]
                if action == "branch":
                    revisions.setdefault(revision, dict(revisions["main"]))
                    return self._reply(200, {})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                if action == "commit":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    added = {
                        line["value"]["path"]: base64.b64decode(line["value"]["content"])
                        for line in lines
                        if line["key"] == "file"
                    }
                    revisions.setdefault(revision, {}).update(added)
                    oid = hashlib.sha1(body).hexdigest()
                    hub.commits.append(
                        {"repo_id": repo_id, "revision": revision, "summary": header["summary"], "files": sorted(added)}
                    )
                    return self._reply(
                        200,
                        {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
                    )
                return self._reply(404, {"error": f"unknown action {action}"})

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
