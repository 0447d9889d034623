"""Progress of a stage: counts, rate and ETA, printed at least every ``EVERY_S`` seconds (tqdm).

On a terminal, a tqdm bar on stderr; otherwise (a log file, ``ray job submit``) each update is one line,
so logs stay readable. The ETA is elapsed / done * remaining (tqdm with ``smoothing=0``), and a
heartbeat thread re-prints the line while nothing finishes, so a long task never leaves the run silent.
"""
import sys
import threading

from tqdm import tqdm

EVERY_S = 10.0
FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit}, {rate_noinv_fmt}, ETA {remaining}, elapsed {elapsed}{postfix}"


class LineWriter:
    """A file for tqdm that writes each redraw as one line (tqdm redraws with carriage returns and padding)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


class StageBar(tqdm):
    """``StageBar("corpus", "units tokenized", total)``: a tqdm whose line starts with ``[stage] what``.

    Prints at creation (so a stage shows before its first item finishes), after an update at most every
    ``every`` seconds, every ``every`` seconds while nothing finishes (a daemon thread) and once at close.
    ``file``: default stderr (a bar on a terminal, one line per update elsewhere).
    """

    def __init__(self, stage: str, what: str, total: int, unit: str = "", every: float = EVERY_S, file=None, initial: int = 0,
                 postfix: str | None = None):
        stream = sys.stderr if file is None else file
        out = stream if stream.isatty() else LineWriter(stream)
        super().__init__(total=total, desc=f"[{stage}] {what}", unit=f" {unit}" if unit else "", file=out,
                         mininterval=every, maxinterval=every, miniters=1, smoothing=0, bar_format=FORMAT,
                         dynamic_ncols=False, disable=False, initial=initial,
                         postfix=postfix)
        self.every = every
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.every):
            if self._time() - self.last_print_t >= self.every:
                self.refresh()
                self.last_print_t = self._time()

    def close(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
        super().close()
