"""The deployment kit (export/): the REST client against TF Serving's API."""

import json

import numpy as np
import pytest

from tests.conftest import load_kit_module


@pytest.fixture
def fake_tf_serving(exported):
    """A stand-in for TF Serving's REST predict API (columnar format), backed by the
    SavedModel; records the requests it gets."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import tensorflow as tf

    model, _ = exported
    served = tf.saved_model.load(str(model)).signatures["serving_default"]
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            if self.path != "/v1/models/lenet:predict":
                self.send_response(404)
                self.end_headers()
                self.wfile.write(b'{"error": "Servable not found"}')
                return
            images = np.asarray(body["inputs"]["images"], np.uint8)
            out = {k: v.numpy().tolist() for k, v in served(images=tf.constant(images)).items()}
            payload = json.dumps({"outputs": out}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_rest_client_against_the_serving_api(fake_tf_serving, test_idx, dataset, exported,
                                             capsys, tmp_path):
    url, seen = fake_tf_serving
    client = load_kit_module("rest_client")
    images, labels = map(str, test_idx)
    assert client.main([images, "--labels", labels, "--url", url, "--batch", "4096"]) == 0
    line = capsys.readouterr().out.strip()
    _, info = exported
    n = len(dataset.test)
    assert line == f"accuracy {info['checkpoint']['test_accuracy']:.4f} on {n:,} images"
    assert len(seen) == -(-n // 4096) and seen[0][1]["signature_name"] == "serving_default"

    req = tmp_path / "request.json"
    assert client.main([images, "--write-request", str(req), "--batch", "2"]) == 0
    body = json.loads(req.read_text())
    assert np.asarray(body["inputs"]["images"]).shape == (2, 28, 28, 1)

    assert client.main([images, "--url", url, "--model", "other"]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert client.main([images, "--url", "http://127.0.0.1:9", "--timeout", "5"]) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
