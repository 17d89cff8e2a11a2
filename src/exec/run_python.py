def _zcbot_run_python():
    # Runs a stateless run_python program (the path of its memfd, or "-" for stdin, in argv[1])
    # under the name <run_python>, so that a traceback says where the caller's code failed
    # instead of naming /proc/self/fd/3. Passed as `python3 -c`: its own frames are "<string>",
    # and the excepthook leaves them out.
    import linecache
    import sys

    name = "<run_python>"
    path = sys.argv[1]
    if path == "-":
        source = sys.stdin.buffer.read()
    else:
        with open(path, "rb") as f:
            source = f.read()

    def hook(kind, value, tb, shown=sys.excepthook):
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
            tb = tb.tb_next
        try:
            # The traceback module, not the interpreter's own printer: it uses this tb (the
            # interpreter's takes the exception's own) and shows the lines from linecache.
            import traceback

            traceback.print_exception(kind, value, tb)
        except BaseException:
            shown(kind, value, tb)

    sys.excepthook = hook
    sys.argv = [name]
    text = source.decode("utf-8", "replace")
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    code = compile(source, name, "exec")
    main = sys.modules["__main__"].__dict__
    del main["_zcbot_run_python"]
    exec(code, main)


_zcbot_run_python()
