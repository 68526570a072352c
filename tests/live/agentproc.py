"""The live agent as a subprocess (`xstate-agent run`), and a real QEMU, for the live tests."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from agent.events.reader import decode_line
from livecheck import require, require_bpf, require_kvm

AGENT = Path(sys.prefix) / "bin" / "xstate-agent"
ROOT = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-system-x86_64")


def wait_until(pred, timeout: float, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step)


class Agent:
    """`xstate-agent run --events-log DIR/events.jsonl --listen 127.0.0.1:0 ARGS`, ready (probes attached)."""

    def __init__(self, directory: Path, *args: str, events_log: bool = True):
        require_bpf()
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "events.jsonl"
        self.out = self.dir / "stdout"
        self.err = self.dir / "stderr"
        cmd = [str(AGENT), "run", "--listen", "127.0.0.1:0", *args]
        if events_log:
            cmd += ["--events-log", str(self.log)]
        self.started = time.monotonic()
        self._file_id, self._offset, self._events = None, 0, []
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=self.dir)
        ready = wait_until(lambda: "ready:" in self.stderr() or self.proc.poll() is not None, 120, 0.05)
        if self.proc.poll() is not None or not ready:
            self.stop()
            raise AssertionError(f"the agent did not start (exit {self.proc.returncode}):\n{self.stderr()}")
        self.startup_s = time.monotonic() - self.started
        # The line is text, or with --log-format json an object whose msg is that text.
        self.metrics_url = re.search(r"^(?:{.*\"msg\":\")?metrics on ([^\s\"]+)", self.stderr(), re.M)[1]
        self.returncode = None

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def events(self) -> list:
        """Every event in the log so far (complete lines), decoded by the strict spec reader; read on from
        where the last call stopped (from the start again if the file was replaced)."""
        with open(self.log, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_ino, st.st_dev) != self._file_id or st.st_size < self._offset:
                self._file_id, self._offset, self._events = (st.st_ino, st.st_dev), 0, []
            f.seek(self._offset)
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]
        self._offset += len(data)
        for line in data.splitlines():
            if line.strip() and not line.startswith(b"#"):
                self._events.append(decode_line(line))
        return list(self._events)

    def wait_events(self, pred, timeout: float = 10.0) -> list:
        """The log's events, read again until pred(those events) holds; fails after timeout."""
        def check():
            evs = self.events()
            return evs if pred(evs) else None
        got = wait_until(check, timeout, 0.05)
        assert got, f"not seen within {timeout} s; the log has {len(self.events())} events"
        return got

    def violations(self) -> list[dict]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def metrics(self) -> str:
        import urllib.request
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode


class Qemu:
    """Debian's QEMU on KVM, paused (-S), with a human monitor on a unix socket; quit() ends it."""

    def __init__(self, directory: Path, name: str = "xstate-test", smp: int = 2, *extra: str):
        require_kvm()
        require(QEMU is not None, "needs qemu-system-x86_64 (Debian package qemu-system-x86, scripts/install-deps.sh)")
        self.sock = Path(directory) / f"{name}.monitor"
        self.smp = smp
        cmd = [QEMU, "-accel", "kvm", "-cpu", "qemu64,+xsave", "-smp", str(smp), "-m", "64", "-S", "-display", "none",
               "-nodefaults", "-name", f"guest={name}", "-monitor", f"unix:{self.sock},server,nowait", *extra]
        self.err = Path(directory) / f"{name}.stderr"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.pid = self.proc.pid
        ok = wait_until(lambda: self.vcpu_fds() >= smp and self.sock.exists() or self.proc.poll() is not None, 30)
        assert ok and self.proc.poll() is None, f"QEMU did not start: {self.err.read_text()}"

    def vcpu_fds(self) -> int:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                try:
                    if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("anon_inode:kvm-vcpu"):
                        n += 1
                except OSError:
                    pass
        except OSError:
            pass
        return n

    def monitor(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.sock))
            out = b""
            while not out.endswith(b"(qemu) "):  # the banner and first prompt
                chunk = s.recv(4096)
                if not chunk:
                    break
                out += chunk
            s.sendall(command.encode() + b"\n")
            out = b""
            try:
                while not out.endswith(b"(qemu) "):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    out += chunk
            except (socket.timeout, ConnectionResetError):
                pass
            return out.decode(errors="replace")

    def quit(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            try:
                self.monitor("quit")
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
