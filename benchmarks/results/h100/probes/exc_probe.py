"""Which C++ exceptions crash the process on this image? Each step in a fresh subprocess."""
import subprocess, sys
STEPS = {
    "torch_cpp_error_fresh": "import torch\ntry:\n    torch.mm(torch.randn(2,3), torch.randn(4,5))\nexcept RuntimeError as e: print('raised', str(e)[:80])",
    "ours_fresh": "import torch\nfrom palm_fast._ext import cpp\nq=torch.randn(1,7,2,8); k=torch.randn(1,7,8)\ntry:\n    cpp().mqa_attn_fwd(q, k[:, :5], k, 0.5)\nexcept RuntimeError as e: print('raised', str(e)[:80])",
    "ours_after_import_palm_fast": "import torch, palm_fast\nfrom palm_fast._ext import cpp\nq=torch.randn(1,7,2,8); k=torch.randn(1,7,8)\ntry:\n    cpp().mqa_attn_fwd(q, k[:, :5], k, 0.5)\nexcept RuntimeError as e: print('raised', str(e)[:80])",
    "torch_after_triton_kernel": "import torch, palm_fast\nfrom palm_fast.ops import swiglu\nx=torch.randn(4,64,device='cuda'); swiglu(x[:, :32], x[:, 32:]); torch.cuda.synchronize()\ntry:\n    torch.mm(torch.randn(2,3), torch.randn(4,5))\nexcept RuntimeError as e: print('raised', str(e)[:80])",
    "ours_after_triton_kernel": "import torch, palm_fast\nfrom palm_fast._ext import cpp\nfrom palm_fast.ops import swiglu\nx=torch.randn(4,64,device='cuda'); swiglu(x[:, :32], x[:, 32:]); torch.cuda.synchronize()\nq=torch.randn(1,7,2,8); k=torch.randn(1,7,8)\ntry:\n    cpp().mqa_attn_fwd(q, k[:, :5], k, 0.5)\nexcept RuntimeError as e: print('raised', str(e)[:80])",
    "torch_after_import_pytest": "import pytest, torch\ntry:\n    torch.mm(torch.randn(2,3), torch.randn(4,5))\nexcept RuntimeError as e: print('raised', str(e)[:80])",
}
for name, code in STEPS.items():
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    print(f"{name}: rc={r.returncode} out={r.stdout.strip()[:100]!r} err={r.stderr.strip()[-200:]!r}", flush=True)
