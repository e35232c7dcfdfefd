"""The CLI's malloc thresholds: commands that run a model reuse freed blocks, the others hand them back."""

import subprocess
import sys

import pytest

# Allocates, touches and frees a 3 MB float32 tensor 50 times (a prefill's activation size) after the
# command's setting, and prints the minor page faults that took.
SCRIPT = """
import resource, sys, torch
from quipkit.cli import _tune_allocator
_tune_allocator(sys.argv[1])
torch.empty(512, 1536).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    torch.empty(512, 1536).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("command, reuses", [("generate", True), ("eval", True), ("quantize", False)])
def test_model_running_commands_reuse_freed_blocks(command, reuses):
    faults = int(subprocess.run([sys.executable, "-c", SCRIPT, command], capture_output=True, text=True,
                                check=True).stdout)
    pages = 512 * 1536 * 4 // 4096
    if reuses:
        assert faults < 10 * pages  # a few tensors' pages while the heap grows, then none
    else:
        assert faults >= 50 * pages // 2  # each tensor mapped afresh (huge pages could halve the count)
