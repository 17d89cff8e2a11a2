# The interpreter of a Python session (run_python with "session"), started by the channel helper
# under its own supervisor, as the tenant's uid, inside the sandbox. The daemon sends this file
# as the program; nothing of it is in the image.
#
# Requests arrive on descriptor 3, replies leave on 4, each `u32 big-endian length | bytes`. The
# first reply is this process's pid (4 bytes), so the helper can interrupt it; each request is
# code, each later reply the JSON of its run: the repr of a final expression, the exception, rich
# results, the interpreter's memory. What the code prints goes to descriptors 1 and 2 (the
# helper's pipes), written through, so it streams and is all in the pipes before the reply.
#
# SIGINT (a timeout or cancel) raises KeyboardInterrupt in the code only while it runs; the
# session's state survives it. Everything here runs with the tenant's code in one process: it is
# a convenience, not a boundary (the sandbox and the supervisor are the boundary).

import ast
import base64
import io
import json
import linecache
import os
import signal
import struct
import sys
import traceback
import types
import warnings

MAX_VALUE = 64 << 10  # characters of a final expression's repr kept
MAX_ERROR = 4 << 10  # characters of an exception's text kept
MAX_RESULTS = 16  # rich results per run
MAX_RESULT_BYTES = 4 << 20  # bytes (UTF-8) of rich results per run, base64 included
MIMES = (
    ("_repr_png_", "image/png", True),
    ("_repr_jpeg_", "image/jpeg", True),
    ("_repr_svg_", "image/svg+xml", False),
    ("_repr_html_", "text/html", False),
    ("_repr_markdown_", "text/markdown", False),
)

REQ = os.dup(3)  # os.dup makes non-inheritable copies: subprocesses get neither pipe
REP = os.dup(4)
os.close(3)
os.close(4)

def text_stream(fd):
    """Descriptor `fd` as text written through at once: output streams and precedes the reply."""
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
        write_through=True,
    )


OUT = text_stream(1)
ERR = text_stream(2)

running = False


def on_sigint(signum, frame):
    if running:
        raise KeyboardInterrupt


signal.signal(signal.SIGINT, on_sigint)
# plt.show() under the non-interactive backend: figures are returned at the end of the run.
warnings.filterwarnings("ignore", message=".*non-interactive.*cannot be shown")


def read_exact(n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(REQ, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def send(payload):
    data = struct.pack(">I", len(payload)) + payload
    view = memoryview(data)
    while view:
        view = view[os.write(REP, view) :]


def rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def cut(text, limit):
    return text if len(text) <= limit else text[:limit] + "... [%d characters omitted]" % (len(text) - limit)


class Results:
    """Rich results of one run, bounded in count and bytes; what does not fit is counted."""

    def __init__(self):
        self.items = []
        self.size = 0
        self.dropped = 0

    def add(self, mime, data):
        # Bytes as they will be sent (UTF-8), so the reply stays far below the helper's bound.
        size = len(data.encode("utf-8", "replace"))
        if len(self.items) >= MAX_RESULTS or self.size + size > MAX_RESULT_BYTES:
            self.dropped += 1
            return
        self.items.append({"mime": mime, "data": data})
        self.size += size

    def of_object(self, value):
        for method, mime, binary in MIMES:
            fn = getattr(type(value), method, None)
            if fn is None:
                continue
            try:
                data = fn(value)
            except Exception:
                continue  # a broken formatter loses that form only, as in a notebook
            if data is None:
                continue
            if binary:
                if isinstance(data, str):
                    data = data.encode("latin-1")
                self.add(mime, base64.b64encode(bytes(data)).decode("ascii"))
            else:
                self.add(mime, str(data))

    def of_figures(self):
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        try:
            for num in plt.get_fignums():
                fig = plt.figure(num)
                buf = io.BytesIO()
                fig.savefig(buf, format="png", bbox_inches="tight")
                self.add("image/png", base64.b64encode(buf.getvalue()).decode("ascii"))
        finally:
            plt.close("all")


def error_of(exc):
    try:
        text = str(exc)
    except BaseException:
        text = "<exception text unavailable>"
    return {"name": type(exc).__name__, "value": cut(text, MAX_ERROR)}


def show_traceback(exc):
    # The kernel's own frames (the exec below) are left out, as a notebook does.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    try:
        ERR.write("".join(traceback.format_exception(type(exc), exc, tb)))
    except BaseException:
        ERR.write("%s\n" % type(exc).__name__)


# The code's globals are a module of their own named __main__ (pickle and multiprocessing look
# functions up there), not this file's.
MAIN = types.ModuleType("__main__")
sys.modules["__main__"] = MAIN
namespace = MAIN.__dict__
if sys.path and sys.path[0].startswith("/proc/"):
    sys.path[0] = ""  # as in an interactive interpreter: the working directory


def run(cell, code, reply):
    global running
    name = "<cell-%d>" % cell
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    results = Results()
    try:
        running = True
        tree = ast.parse(code, name, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, name, "exec"), namespace)
        if last is not None:
            value = eval(compile(last, name, "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                reply["value"] = cut(repr(value), MAX_VALUE)
                results.of_object(value)
        results.of_figures()
        running = False
    except BaseException as exc:
        running = False
        reply["error"] = error_of(exc)
        show_traceback(exc)
    if results.items:
        reply["results"] = results.items
    if results.dropped:
        reply["results_dropped"] = results.dropped
        ERR.write(
            "[zcbot: %d rich result(s) dropped: at most %d per call and %d bytes of base64]\n"
            % (results.dropped, MAX_RESULTS, MAX_RESULT_BYTES)
        )


def main():
    global running
    send(struct.pack(">i", os.getpid()))
    cell = 0
    while True:
        header = read_exact(4)
        if header is None:
            return
        (n,) = struct.unpack(">I", header)
        body = read_exact(n)
        if body is None:
            return
        cell += 1
        reply = {}
        sys.stdout, sys.stderr = OUT, ERR
        try:
            run(cell, body.decode("utf-8", "replace"), reply)
        except BaseException as exc:
            # An interrupt that landed between the code's end and the line that ends its run.
            running = False
            reply.setdefault("error", error_of(exc))
        for stream in (OUT, ERR):
            try:
                stream.flush()
            except BaseException:
                pass
        reply["rss"] = rss()
        # Lone surrogates (a repr can hold them) are no valid UTF-8: replaced, not refused.
        send(json.dumps(reply, ensure_ascii=False).encode("utf-8", "replace"))


main()
