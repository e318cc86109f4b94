"""A GPU check of liger-kernel's fused linear cross-entropy (recipes/fused_loss.py) against logits + torch's
cross-entropy at a LLaMA-3 output layer (128k vocabulary, 4 x 2048 tokens, bf16): loss, hidden-state gradient and
peak memory.   python bench/fused_loss_check.py"""
import torch, torch.nn.functional as F
from recipes.fused_loss import liger_loss
torch.manual_seed(0); h=torch.randn(4,2048,4096,device='cuda',dtype=torch.bfloat16,requires_grad=True); w=torch.randn(128256,4096,device='cuda',dtype=torch.bfloat16)*0.02
y=torch.randint(0,128256,(4,2048),device='cuda'); y[:,:100]=-100; n=(y[:,1:]!=-100).sum()
torch.cuda.reset_peak_memory_stats(); a=liger_loss(h,w,y,n); a.backward(); ga=h.grad.clone(); h.grad=None; pa=torch.cuda.max_memory_allocated()/2**30
torch.cuda.reset_peak_memory_stats(); lg=(h@w.T).float(); b=F.cross_entropy(lg[:,:-1].reshape(-1,lg.shape[-1]),y[:,1:].reshape(-1),reduction='sum')/n; b.backward(); pb=torch.cuda.max_memory_allocated()/2**30
print('liger',a.item(),'torch',b.item(),'grad maxdiff',(ga-h.grad).abs().max().item(),'peak GiB',pa,pb)
