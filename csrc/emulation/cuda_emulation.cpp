// CUDA emulation layer, runtime: launches, the block scheduler (threads as fibers), warp collectives,
// barriers with deadlock detection, the emulated device's properties, and the handlers of the
// -fsanitize=alignment,bounds checks the emulated kernels are compiled with. Design: cuda_emulation.h and
// docs/cuda_emulation.md.
#include "emulation/cuda_emulation.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/CPUAllocator.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <deque>
#include <exception>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <vector>

// ---------------------------------------------------------------------------------------------------------------
// Fiber context switch. x86-64: a 20-instruction switch of the callee-saved registers, MXCSR and the x87 control
// word (what the SysV ABI says survives a call), because glibc's swapcontext also saves the signal mask with a
// system call on every switch, and the kernels switch at every warp shuffle (~10x slower end to end). Elsewhere:
// POSIX ucontext.
#if defined(__x86_64__)
extern "C" void torchnova_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl torchnova_emu_switch
.hidden torchnova_emu_switch
.type torchnova_emu_switch,@function
torchnova_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size torchnova_emu_switch, .-torchnova_emu_switch
)");

namespace {
struct FiberContext {
  void* sp = nullptr;
};
// A fresh context that starts `entry` (which must never return) on the stack [low, low + bytes).
void context_init(FiberContext& c, char* low, size_t bytes, void (*entry)()) {
  auto* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(low + bytes)) & ~uintptr_t(15));
  *--sp = 0;                                  // return address of entry: none (rsp % 16 == 8 at its first instruction)
  *--sp = reinterpret_cast<uint64_t>(entry);  // where the switch's ret goes
  for (int i = 0; i < 6; ++i) *--sp = 0;      // rbp rbx r12 r13 r14 r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  uint64_t word;
  std::memcpy(&word, csr, 8);
  *--sp = word;
  c.sp = sp;
}
void context_switch(FiberContext& from, FiberContext& to) { torchnova_emu_switch(&from.sp, to.sp); }
}  // namespace
#else
namespace {
struct FiberContext {
  ucontext_t uc;
};
void context_init(FiberContext& c, char* low, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = low;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void context_switch(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }
}  // namespace
#endif

namespace torchnova_emu {

__thread uint3 tl_thread_idx = {0, 0, 0};
__thread uint3 tl_block_idx = {0, 0, 0};
__thread dim3 tl_block_dim;
__thread dim3 tl_grid_dim;

namespace {

// ---------------------------------------------------------------------------------------------------------------
// The emulated device.

DeviceProperties make_default_properties() {
  DeviceProperties p{};
  std::snprintf(p.name, sizeof(p.name), "torchnova CUDA emulation (sm_90 limits)");
  p.major = 9;
  p.minor = 0;
  p.multiProcessorCount = 132;
  p.sharedMemPerBlock = 48 * 1024;
  p.sharedMemPerBlockOptin = 227 * 1024;
  p.maxThreadsPerBlock = 1024;
  p.warpSize = 32;
  return p;
}

DeviceProperties g_properties = make_default_properties();
// The race check's second schedule: the fibers of a block run in reverse thread order (set_reverse_schedule).
bool g_reverse_schedule = false;
std::mutex g_optin_mutex;
std::unordered_map<const void*, int> g_optin_bytes;

// ---------------------------------------------------------------------------------------------------------------
// Fibers.

enum class FiberState { kRunnable, kAtBarrier, kAtWarpOp, kDone };

struct WarpOp {
  WarpOpKind kind;
  unsigned mask;
  uint64_t bits;
  int arg;
  int width;
  uint64_t result;
};

// A cp.async the thread issued: carried out when a cp_async_wait waits for its group.
struct PendingCopy {
  void* shared;
  const void* global;
  int bytes;
  int src_bytes;
};

struct Fiber {
  FiberContext context;
  FiberState state;
  uint3 tid;
  int linear;
  WarpOp op;
  std::vector<PendingCopy> uncommitted_copies;             // since the last cp_async_commit
  std::deque<std::vector<PendingCopy>> committed_copies;  // oldest group first
};

// The operands of one lane at a tensor-core collective (WarpOp::bits points at it).
struct MmaOperands {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};
struct LdmatrixOperands {
  uint32_t* r;
  const void* row;
};

void carry_out(const PendingCopy& copy) {
  if (copy.src_bytes > 0) std::memcpy(copy.shared, copy.global, size_t(copy.src_bytes));
  std::memset(static_cast<char*>(copy.shared) + copy.src_bytes, 0, size_t(copy.bytes - copy.src_bytes));
}

constexpr size_t kFiberStackBytes = 256 * 1024;

const char* op_name(WarpOpKind kind) {
  switch (kind) {
    case WarpOpKind::kShflIdx:
      return "__shfl_sync";
    case WarpOpKind::kShflUp:
      return "__shfl_up_sync";
    case WarpOpKind::kShflDown:
      return "__shfl_down_sync";
    case WarpOpKind::kShflXor:
      return "__shfl_xor_sync";
    case WarpOpKind::kBallot:
      return "__ballot_sync";
    case WarpOpKind::kAny:
      return "__any_sync";
    case WarpOpKind::kAll:
      return "__all_sync";
    case WarpOpKind::kSyncWarp:
      return "__syncwarp";
    case WarpOpKind::kMma:
      return "mma.sync";
    case WarpOpKind::kLdmatrix:
      return "ldmatrix.sync";
  }
  return "?";
}

std::string format_dim(const uint3& d) {
  std::ostringstream s;
  s << "(" << d.x << "," << d.y << "," << d.z << ")";
  return s.str();
}
std::string format_dim(const dim3& d) { return format_dim(uint3{d.x, d.y, d.z}); }

// Per OS thread: the fibers of the running block (stacks reused from block to block and launch to launch).
struct BlockRunner {
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;  // mmap'd, lowest page PROT_NONE (a stack overflow faults instead of corrupting)
  FiberContext scheduler;
  const LaunchSpec* spec = nullptr;
  int threads = 0;
  int current = -1;  // fiber running now, -1 in the scheduler
  int at_barrier = 0;
  int done = 0;
  bool failed = false;
  std::string error;

  ~BlockRunner() {
    for (char* stack : stacks) munmap(stack, kFiberStackBytes);
  }

  void ensure_fibers(int n) {
    if (int(fibers.size()) < n) fibers.resize(n);
    while (int(stacks.size()) < n) {
      void* mem = mmap(nullptr, kFiberStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
      TORCH_CHECK(mem != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
      mprotect(mem, size_t(getpagesize()), PROT_NONE);
      stacks.push_back(static_cast<char*>(mem));
    }
  }

  std::string where(int fiber) const {
    std::ostringstream s;
    s << "kernel " << spec->kernel_name << ", grid " << format_dim(spec->grid) << " x block "
      << format_dim(spec->block) << ": block " << format_dim(tl_block_idx);
    if (fiber >= 0) s << ", thread " << format_dim(fibers[fiber].tid);
    return s.str();
  }

  std::string describe_thread(int fiber) const {
    std::ostringstream s;
    const Fiber& f = fibers[fiber];
    s << "thread " << format_dim(f.tid) << " (warp " << fiber / 32 << " lane " << fiber % 32 << ")";
    return s.str();
  }

  std::string describe_state(int fiber) const {
    const Fiber& f = fibers[fiber];
    switch (f.state) {
      case FiberState::kRunnable:
        return "is running";
      case FiberState::kAtBarrier:
        return "waits at __syncthreads";
      case FiberState::kDone:
        return "has exited";
      case FiberState::kAtWarpOp: {
        std::ostringstream s;
        s << "waits at " << op_name(f.op.kind) << " with mask 0x" << std::hex << f.op.mask;
        return s.str();
      }
    }
    return "?";
  }

  // Switches from the running fiber back to the scheduler.
  void yield() {
    const int me = current;
    current = -1;
    context_switch(fibers[me].context, scheduler);
  }

  void resume(int fiber) {
    current = fiber;
    tl_thread_idx = fibers[fiber].tid;
    context_switch(scheduler, fibers[fiber].context);
    current = -1;
  }

  static void fiber_main();

  void run_block() {
    const dim3 b = spec->block;
    threads = int(b.x * b.y * b.z);
    ensure_fibers(threads);
    at_barrier = 0;
    done = 0;
    failed = false;
    error.clear();
    for (int i = 0; i < threads; ++i) {
      Fiber& f = fibers[i];
      f.state = FiberState::kRunnable;
      f.uncommitted_copies.clear();
      f.committed_copies.clear();
      f.linear = i;
      f.tid = {unsigned(i) % b.x, (unsigned(i) / b.x) % b.y, unsigned(i) / (b.x * b.y)};
      const size_t guard = size_t(getpagesize());
      context_init(f.context, stacks[i] + guard, kFiberStackBytes - guard, &BlockRunner::fiber_main);
    }
    while (done < threads) {
      bool ran = false;
      for (int n = 0; n < threads && !failed; ++n) {
        const int i = g_reverse_schedule ? threads - 1 - n : n;
        if (fibers[i].state == FiberState::kRunnable) {
          resume(i);
          ran = true;
        }
      }
      if (failed) break;
      if (at_barrier > 0 && at_barrier + done == threads) {
        if (done > 0) {  // a barrier some thread of the block will never reach
          int exited = 0;
          while (fibers[exited].state != FiberState::kDone) ++exited;
          fail(-1, "deadlock: " + std::to_string(at_barrier) + " of " + std::to_string(threads) +
                       " threads wait at __syncthreads, but " + describe_thread(exited) +
                       " exited without reaching it (every thread of the block must reach every __syncthreads)");
          break;
        }
        at_barrier = 0;
        for (int i = 0; i < threads; ++i) fibers[i].state = FiberState::kRunnable;
        continue;
      }
      if (!ran && done < threads) {
        diagnose_deadlock();
        break;
      }
    }
  }

  void fail(int fiber, const std::string& what) {
    if (failed) return;
    failed = true;
    error = "CUDA emulation: " + where(fiber) + ": " + what;
  }

  // No fiber can run and the block is not finished: find a warp collective that waits for a lane that cannot
  // come (exited, or waiting at __syncthreads or another collective).
  void diagnose_deadlock() {
    for (int i = 0; i < threads; ++i) {
      const Fiber& f = fibers[i];
      if (f.state != FiberState::kAtWarpOp) continue;
      const int warp_base = i & ~31;
      for (int lane = 0; lane < 32; ++lane) {
        if (!((f.op.mask >> lane) & 1)) continue;
        const int other = warp_base + lane;
        if (other >= threads || fibers[other].state != FiberState::kAtWarpOp || fibers[other].op.kind != f.op.kind) {
          std::ostringstream s;
          s << "deadlock: " << op_name(f.op.kind) << " with mask 0x" << std::hex << f.op.mask << std::dec
            << " waits for lane " << lane << ", but "
            << (other >= threads ? "that lane does not exist in this block"
                                 : describe_thread(other) + " " + describe_state(other));
          fail(i, s.str());
          return;
        }
      }
    }
    fail(-1, "deadlock: no thread can proceed (" + std::to_string(at_barrier) + " at __syncthreads, " +
                 std::to_string(done) + " exited)");
  }

  static bool is_tensor_core(WarpOpKind kind) { return kind == WarpOpKind::kMma || kind == WarpOpKind::kLdmatrix; }

  // Whether [address, address + bytes) lies in the launch's dynamic shared memory. Addresses outside the whole
  // dynamic buffer are taken as static __shared__ variables (thread_local here), which cannot be told apart from
  // other host memory.
  void check_shared_range(const void* address, size_t bytes, const char* what) const {
    const char* base = static_cast<const char*>(spec->dynamic_smem_base());
    const char* p = static_cast<const char*>(address);
    if (p < base || p >= base + spec->dynamic_smem_capacity) return;
    if (p + bytes > base + spec->dynamic_smem_bytes) {
      std::ostringstream s;
      s << what << " reaches byte " << (p + bytes - base) << " of dynamic shared memory, but the launch requested "
        << spec->dynamic_smem_bytes << " bytes";
      device_error(s.str());
    }
  }

  // mma.sync / ldmatrix.sync with all 32 lanes of the warp at `warp_base` present, same variant (checked by
  // try_complete). Inputs are gathered from every lane before any output is written (d may alias c).
  void complete_tensor_core(int warp_base) {
    const WarpOp& op = fibers[warp_base].op;
    if (op.kind == WarpOpKind::kMma) {
      const auto kind = static_cast<MmaKind>(op.arg);
      const bool tf32 = kind == MmaKind::kM16N8K8TF32;
      const int k_size = tf32 ? 8 : 16;
      float a[16][16], b[16][8], c[16][8];
      auto half_value = [kind](uint32_t bits16) -> float {
        return kind == MmaKind::kM16N8K16F16 ? float(c10::Half(uint16_t(bits16), c10::Half::from_bits()))
                                             : float(c10::BFloat16(uint16_t(bits16), c10::BFloat16::from_bits()));
      };
      // The tensor cores read only the tf32 bits of a 32-bit operand (sign, exponent, 10 mantissa bits).
      auto tf32_value = [](uint32_t bits) { return bit_cast<float>(bits & 0xffffe000u); };
      for (int lane = 0; lane < 32; ++lane) {
        const auto* in = reinterpret_cast<const MmaOperands*>(fibers[warp_base + lane].op.bits);
        const int group = lane / 4, quad = lane % 4;
        if (tf32) {
          a[group][quad] = tf32_value(in->a[0]);
          a[group + 8][quad] = tf32_value(in->a[1]);
          a[group][quad + 4] = tf32_value(in->a[2]);
          a[group + 8][quad + 4] = tf32_value(in->a[3]);
          b[quad][group] = tf32_value(in->b[0]);
          b[quad + 4][group] = tf32_value(in->b[1]);
        } else {
          for (int reg = 0; reg < 4; ++reg) {
            const int row = group + 8 * (reg & 1), col = 2 * quad + 8 * (reg >> 1);
            a[row][col] = half_value(in->a[reg] & 0xffffu);
            a[row][col + 1] = half_value(in->a[reg] >> 16);
          }
          for (int reg = 0; reg < 2; ++reg) {
            const int k = 2 * quad + 8 * reg;
            b[k][group] = half_value(in->b[reg] & 0xffffu);
            b[k + 1][group] = half_value(in->b[reg] >> 16);
          }
        }
        for (int reg = 0; reg < 4; ++reg) c[group + 8 * (reg >> 1)][2 * quad + (reg & 1)] = in->c[reg];
      }
      for (int lane = 0; lane < 32; ++lane) {
        const auto* out = reinterpret_cast<const MmaOperands*>(fibers[warp_base + lane].op.bits);
        const int group = lane / 4, quad = lane % 4;
        for (int reg = 0; reg < 4; ++reg) {
          const int row = group + 8 * (reg >> 1), col = 2 * quad + (reg & 1);
          // fp32 accumulation in k order; the products of 16-bit and tf32 inputs are exact in fp32.
          float acc = c[row][col];
          for (int k = 0; k < k_size; ++k) acc = std::fma(a[row][k], b[k][col], acc);
          out->d[reg] = acc;
        }
      }
      return;
    }
    // ldmatrix: arg = 2 * matrices + transpose.
    const int matrices = op.arg / 2;
    const bool transpose = op.arg % 2 != 0;
    uint16_t m[4][8][8];
    for (int j = 0; j < matrices; ++j) {
      for (int row = 0; row < 8; ++row) {
        const int lane = 8 * j + row;
        const auto* in = reinterpret_cast<const LdmatrixOperands*>(fibers[warp_base + lane].op.bits);
        if (reinterpret_cast<uintptr_t>(in->row) % 16 != 0) {
          std::ostringstream s;
          s << "ldmatrix: lane " << lane << " gives row address " << in->row
            << ", which is not 16-byte aligned (a GPU raises a misaligned-address error)";
          device_error(s.str());
        }
        check_shared_range(in->row, 16, "ldmatrix row");
        std::memcpy(m[j][row], in->row, 16);
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      const auto* out = reinterpret_cast<const LdmatrixOperands*>(fibers[warp_base + lane].op.bits);
      const int row = lane / 4, col = 2 * (lane % 4);
      for (int j = 0; j < matrices; ++j) {
        const uint32_t low = transpose ? m[j][col][row] : m[j][row][col];
        const uint32_t high = transpose ? m[j][col + 1][row] : m[j][row][col + 1];
        out->r[j] = low | (high << 16);
      }
    }
  }

  // Called by the fiber arriving at a collective (state kAtWarpOp already set). Completes it when every lane of
  // the mask is there; throws when the mask names a lane that cannot take part.
  void try_complete(int me) {
    const Fiber& self = fibers[me];
    const unsigned mask = self.op.mask;
    const int warp_base = me & ~31;
    for (int lane = 0; lane < 32; ++lane) {
      if (!((mask >> lane) & 1)) continue;
      const int other = warp_base + lane;
      if (other >= threads) {
        std::ostringstream s;
        s << op_name(self.op.kind) << " mask 0x" << std::hex << mask << std::dec << " names lane " << lane
          << ", which does not exist (the block has " << threads << " threads)";
        device_error(s.str());
      }
      const Fiber& f = fibers[other];
      if (f.state == FiberState::kRunnable) return;  // not there yet
      if (f.state == FiberState::kAtWarpOp && f.op.kind == self.op.kind && f.op.mask == mask &&
          (!is_tensor_core(f.op.kind) || f.op.arg == self.op.arg)) {
        continue;
      }
      std::ostringstream s;
      s << op_name(self.op.kind) << " mask 0x" << std::hex << mask << std::dec << " names lane " << lane << ", but "
        << describe_thread(other) << " " << describe_state(other);
      device_error(s.str());
    }
    // Everyone is here: compute every lane's result.
    if (is_tensor_core(self.op.kind)) {
      complete_tensor_core(warp_base);
      for (int lane = 0; lane < 32; ++lane) fibers[warp_base + lane].state = FiberState::kRunnable;
      return;
    }
    uint64_t vote = 0;
    bool all = true;
    for (int lane = 0; lane < 32; ++lane) {
      if (!((mask >> lane) & 1)) continue;
      const bool p = fibers[warp_base + lane].op.bits != 0;
      vote |= uint64_t(p) << lane;
      all = all && p;
    }
    for (int lane = 0; lane < 32; ++lane) {
      if (!((mask >> lane) & 1)) continue;
      Fiber& f = fibers[warp_base + lane];
      const int width = f.op.width;
      const int segment = lane & ~(width - 1);
      int src = lane;
      switch (f.op.kind) {
        case WarpOpKind::kShflIdx:
          src = segment + (f.op.arg & (width - 1));
          break;
        case WarpOpKind::kShflUp:
          src = lane - f.op.arg >= segment ? lane - f.op.arg : lane;
          break;
        case WarpOpKind::kShflDown:
          src = lane + f.op.arg < segment + width ? lane + f.op.arg : lane;
          break;
        case WarpOpKind::kShflXor:
          src = lane ^ f.op.arg;
          if (src < segment || src >= segment + width) src = lane;
          break;
        default:
          break;
      }
      switch (f.op.kind) {
        case WarpOpKind::kShflIdx:
        case WarpOpKind::kShflUp:
        case WarpOpKind::kShflDown:
        case WarpOpKind::kShflXor:
          if (!((mask >> src) & 1)) {
            std::ostringstream s;
            s << op_name(f.op.kind) << ": lane " << lane << " reads lane " << src << ", which is not in the mask 0x"
              << std::hex << mask << " (undefined value on a GPU)";
            device_error(s.str());
          }
          f.op.result = fibers[warp_base + src].op.bits;
          break;
        case WarpOpKind::kBallot:
          f.op.result = vote;
          break;
        case WarpOpKind::kAny:
          f.op.result = vote != 0;
          break;
        case WarpOpKind::kAll:
          f.op.result = all;
          break;
        case WarpOpKind::kSyncWarp:
        case WarpOpKind::kMma:  // completed by complete_tensor_core above
        case WarpOpKind::kLdmatrix:
          f.op.result = 0;
          break;
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      if ((mask >> lane) & 1) fibers[warp_base + lane].state = FiberState::kRunnable;
    }
  }
};

thread_local BlockRunner tl_runner;

void BlockRunner::fiber_main() {
  BlockRunner& r = tl_runner;
  const int me = r.current;
  try {
    r.spec->body(r.spec->ctx);
    // cp.async copies never waited for still land (a GPU completes them); nobody can read them any more.
    Fiber& self = r.fibers[me];
    for (const auto& group : self.committed_copies) {
      for (const PendingCopy& copy : group) carry_out(copy);
    }
    for (const PendingCopy& copy : self.uncommitted_copies) carry_out(copy);
  } catch (const c10::Error& e) {
    r.failed = true;
    r.error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    r.failed = true;
    r.error = e.what();
  }
  r.fibers[me].state = FiberState::kDone;
  ++r.done;
  r.current = -1;
  context_switch(r.fibers[me].context, r.scheduler);  // never resumed
  std::abort();
}

bool in_fiber() { return tl_runner.spec != nullptr && tl_runner.current >= 0; }

// ---------------------------------------------------------------------------------------------------------------
// Memory faults inside a kernel (an access to a guard page of the guarded allocator below, or any other invalid
// address) become a launch error naming the kernel, block, thread and address: the SIGSEGV handler redirects the
// faulting fiber to fault_landing, which ends it and returns to the scheduler.
__thread uintptr_t tl_fault_address = 0;
__thread bool tl_altstack_ready = false;
struct sigaction g_previous_segv;
std::once_flag g_segv_once;

[[noreturn]] void fault_landing() {
  BlockRunner& r = tl_runner;
  const int me = r.current;
  std::ostringstream s;
  s << "invalid memory access at address 0x" << std::hex << tl_fault_address << std::dec
    << " (past the end of a tensor allocated inside cuda_emulation(), which puts a guard page after every tensor, "
       "or any other invalid address)";
  r.fail(me, s.str());
  r.fibers[me].state = FiberState::kDone;
  ++r.done;
  r.current = -1;
  context_switch(r.fibers[me].context, r.scheduler);  // never resumed
  std::abort();
}

void segv_handler(int sig, siginfo_t* info, void* raw_context) {
  BlockRunner& r = tl_runner;
#if defined(__x86_64__)
  if (r.spec != nullptr && r.current >= 0) {
    auto* uc = static_cast<ucontext_t*>(raw_context);
    tl_fault_address = reinterpret_cast<uintptr_t>(info->si_addr);
    // Continue in fault_landing on the fiber's own stack (below the red zone, ABI-aligned as after a call).
    const uintptr_t sp = (uintptr_t(uc->uc_mcontext.gregs[REG_RSP]) - 512) & ~uintptr_t(15);
    uc->uc_mcontext.gregs[REG_RSP] = greg_t(sp - 8);
    uc->uc_mcontext.gregs[REG_RIP] = greg_t(reinterpret_cast<uintptr_t>(&fault_landing));
    return;
  }
#endif
  // Not ours: the previous disposition handles it (re-raised on return).
  sigaction(SIGSEGV, &g_previous_segv, nullptr);
  (void)sig;
}

void install_fault_handler() {
  if (!tl_altstack_ready) {  // the handler must run even when a fiber overflowed its stack
    static thread_local std::vector<char> altstack(64 * 1024);
    stack_t ss{};
    ss.ss_sp = altstack.data();
    ss.ss_size = altstack.size();
    sigaltstack(&ss, nullptr);
    tl_altstack_ready = true;
  }
  struct sigaction current {};
  sigaction(SIGSEGV, nullptr, &current);
  if (current.sa_sigaction == &segv_handler) return;
  struct sigaction action {};
  action.sa_sigaction = &segv_handler;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &g_previous_segv);
}

// ---------------------------------------------------------------------------------------------------------------
// Guarded CPU allocator (enabled inside cuda_emulation()): every tensor ends 0..15 bytes before a PROT_NONE page,
// so a kernel reading or writing past its end (beyond the 16-byte alignment slack) faults at once. Before the
// start is caught only past the page boundary below the data (a buffer cannot end and start on a page boundary).
// The data start stays 16-byte aligned, so the kernels take the same vectorised paths as with the default
// allocator.
// set_guarded_allocation(true, exact_ends=true): tensors end exactly at the guard page (no 16-byte slack), so a
// read 1..15 bytes past the end faults too; the data start is then only as aligned as the size in bytes, and the
// kernels must take their unaligned paths (their alignment checks are exercised as well).
bool g_exact_ends = false;

class GuardedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    const size_t page = size_t(getpagesize());
    // Exact ends: the last byte touches the guard page, and the start is only as aligned as `bytes` is.
    const size_t rounded = g_exact_ends ? bytes : (bytes + 15) & ~size_t(15);
    const size_t data_pages = (rounded + page - 1) / page;
    const size_t total = (data_pages + 2) * page;
    void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "CUDA emulation: guarded allocation of ", bytes, " bytes failed");
    char* low_guard = static_cast<char*>(base);
    char* high_guard = low_guard + (data_pages + 1) * page;
    mprotect(low_guard, page, PROT_NONE);
    mprotect(high_guard, page, PROT_NONE);
    char* data = high_guard - rounded;
    auto* region = new Region{base, total};
    return {data, region, &GuardedAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

 private:
  struct Region {
    void* base;
    size_t bytes;
  };
  static void release(void* raw) {
    auto* region = static_cast<Region*>(raw);
    munmap(region->base, region->bytes);
    delete region;
  }
};

GuardedAllocator g_guarded_allocator;
c10::Allocator* g_saved_allocator = nullptr;

void check_launch(const LaunchSpec& spec) {
  const dim3 g = spec.grid, b = spec.block;
  const std::string name = spec.kernel_name;
  TORCH_CHECK(g.x > 0 && g.y > 0 && g.z > 0 && b.x > 0 && b.y > 0 && b.z > 0,
              "CUDA emulation: kernel ", name, " launched with an empty configuration, grid ", format_dim(g),
              " block ", format_dim(b), " (a GPU fails with cudaErrorInvalidConfiguration)");
  TORCH_CHECK(g.x <= 2147483647u && g.y <= 65535u && g.z <= 65535u, "CUDA emulation: kernel ", name, ": grid ",
              format_dim(g), " exceeds the limits (2^31-1, 65535, 65535)");
  TORCH_CHECK(uint64_t(b.x) * b.y * b.z <= 1024 && b.z <= 64, "CUDA emulation: kernel ", name, ": block ",
              format_dim(b), " exceeds 1024 threads (or 64 in z)");
  const size_t smem = spec.dynamic_smem_bytes;
  if (smem > g_properties.sharedMemPerBlock) {
    int optin = 0;
    {
      std::lock_guard<std::mutex> lock(g_optin_mutex);
      auto it = g_optin_bytes.find(spec.kernel_address);
      if (it != g_optin_bytes.end()) optin = it->second;
    }
    TORCH_CHECK(smem <= size_t(optin), "CUDA emulation: kernel ", name, " launched with ", smem,
                " bytes of dynamic shared memory, above the default 48 KiB, but cudaFuncSetAttribute("
                "MaxDynamicSharedMemorySize) allowed only ",
                optin, " bytes for this kernel (a GPU fails the launch)");
  }
  TORCH_CHECK(smem <= g_properties.sharedMemPerBlockOptin, "CUDA emulation: kernel ", name, " launched with ", smem,
              " bytes of dynamic shared memory; the emulated device allows ", g_properties.sharedMemPerBlockOptin);
  TORCH_CHECK(smem + 256 <= spec.dynamic_smem_capacity, "CUDA emulation: internal: dynamic shared buffer too small");
}

constexpr size_t kCanaryBytes = 256;

}  // namespace

const DeviceProperties* device_properties() { return &g_properties; }

void set_device_limits(int multiprocessors, size_t smem_optin_bytes) {
  g_properties.multiProcessorCount = multiprocessors;
  g_properties.sharedMemPerBlockOptin = smem_optin_bytes;
}

void set_max_dynamic_smem(const void* kernel_address, int bytes) {
  TORCH_CHECK(bytes >= 0 && size_t(bytes) <= g_properties.sharedMemPerBlockOptin,
              "CUDA emulation: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ", bytes,
              ") exceeds the device's opt-in limit ", g_properties.sharedMemPerBlockOptin,
              " (a GPU returns cudaErrorInvalidValue)");
  std::lock_guard<std::mutex> lock(g_optin_mutex);
  g_optin_bytes[kernel_address] = bytes;
}

[[noreturn]] void device_error(const std::string& what) {
  BlockRunner& r = tl_runner;
  if (in_fiber()) throw std::runtime_error("CUDA emulation: " + r.where(r.current) + ": " + what);
  TORCH_CHECK(false, "CUDA emulation: ", what);
}

uint64_t warp_collective(WarpOpKind kind, unsigned mask, uint64_t bits, int arg, int width) {
  BlockRunner& r = tl_runner;
  TORCH_CHECK(in_fiber(), "CUDA emulation: ", op_name(kind), " called outside a kernel");
  const int me = r.current;
  const int lane = me & 31;
  if (!((mask >> lane) & 1)) {
    std::ostringstream s;
    s << op_name(kind) << " mask 0x" << std::hex << mask << std::dec << " does not include the calling lane " << lane;
    device_error(s.str());
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    device_error(std::string(op_name(kind)) + ": width must be a power of two in 1..32, got " + std::to_string(width));
  }
  Fiber& f = r.fibers[me];
  f.op = {kind, mask, bits, arg, width, 0};
  f.state = FiberState::kAtWarpOp;
  r.try_complete(me);
  if (f.state == FiberState::kAtWarpOp) r.yield();
  return r.fibers[me].op.result;
}

void tensor_core_mma(MmaKind kind, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  const MmaOperands operands{d, a, b, c};
  warp_collective(WarpOpKind::kMma, 0xffffffffu, reinterpret_cast<uint64_t>(&operands), int(kind), 32);
}

void tensor_core_ldmatrix(int matrices, bool transpose, uint32_t* r, const void* shared_row) {
  const LdmatrixOperands operands{r, shared_row};
  warp_collective(WarpOpKind::kLdmatrix, 0xffffffffu, reinterpret_cast<uint64_t>(&operands),
                  2 * matrices + (transpose ? 1 : 0), 32);
}

void cp_async(void* shared, const void* global, int bytes, int src_bytes) {
  BlockRunner& r = tl_runner;
  TORCH_CHECK(in_fiber(), "CUDA emulation: cp.async called outside a kernel");
  if (bytes != 16 || src_bytes < 0 || src_bytes > bytes) {
    device_error("cp.async.cg copies 16 bytes with a source size in 0..16, got " + std::to_string(bytes) + " and " +
                 std::to_string(src_bytes));
  }
  if (reinterpret_cast<uintptr_t>(shared) % 16 != 0 || reinterpret_cast<uintptr_t>(global) % 16 != 0) {
    std::ostringstream s;
    s << "cp.async of 16 bytes needs 16-byte aligned addresses, got shared " << shared << " and global " << global;
    device_error(s.str());
  }
  r.check_shared_range(shared, 16, "cp.async destination");
  r.fibers[r.current].uncommitted_copies.push_back({shared, global, bytes, src_bytes});
}

void cp_async_commit() {
  BlockRunner& r = tl_runner;
  TORCH_CHECK(in_fiber(), "CUDA emulation: cp.async.commit_group called outside a kernel");
  Fiber& f = r.fibers[r.current];
  f.committed_copies.push_back(std::move(f.uncommitted_copies));
  f.uncommitted_copies.clear();
}

void cp_async_wait(int newer_groups_allowed) {
  BlockRunner& r = tl_runner;
  TORCH_CHECK(in_fiber(), "CUDA emulation: cp.async.wait_group called outside a kernel");
  Fiber& f = r.fibers[r.current];
  while (int(f.committed_copies.size()) > newer_groups_allowed) {
    for (const PendingCopy& copy : f.committed_copies.front()) carry_out(copy);
    f.committed_copies.pop_front();
  }
}

uint32_t float_to_tf32_bits(float x) {
  uint32_t bits = bit_cast<uint32_t>(x);
  if ((bits & 0x7f800000u) == 0x7f800000u) return bits;  // inf and NaN pass through
  // Round to nearest, ties away from zero, at mantissa bit 13 (the magnitude bits carry into the exponent).
  return (bits + 0x1000u) & 0xffffe000u;
}

void set_reverse_schedule(bool reverse) { g_reverse_schedule = reverse; }
bool reverse_schedule() { return g_reverse_schedule; }

void block_barrier() {
  BlockRunner& r = tl_runner;
  TORCH_CHECK(in_fiber(), "CUDA emulation: __syncthreads called outside a kernel");
  r.fibers[r.current].state = FiberState::kAtBarrier;
  ++r.at_barrier;
  r.yield();
}

at::Tensor guarded_copy(const at::Tensor& t) {
  if (!t.defined() || !t.is_cpu() || at::has_internal_overlap(t) == at::MemOverlap::Yes) return t;
  const bool was_enabled = g_saved_allocator != nullptr;
  set_guarded_allocation(true, g_exact_ends);
  at::Tensor copy = at::empty_strided(t.sizes(), t.strides(), t.options());
  if (!was_enabled) set_guarded_allocation(false, g_exact_ends);
  copy.copy_(t);
  return copy;
}

void set_guarded_allocation(bool enabled, bool exact_ends) {
  g_exact_ends = enabled && exact_ends;
  if (enabled) {
    if (g_saved_allocator != nullptr) return;
    g_saved_allocator = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&g_guarded_allocator, /*priority=*/255);
  } else {
    if (g_saved_allocator == nullptr) return;
    c10::SetCPUAllocator(g_saved_allocator, /*priority=*/255);
    g_saved_allocator = nullptr;
  }
}

void launch(const LaunchSpec& spec) {
  check_launch(spec);
  install_fault_handler();
  BlockRunner& r = tl_runner;
  TORCH_CHECK(r.spec == nullptr, "CUDA emulation: kernel ", spec.kernel_name, " launched from inside a kernel");
  r.spec = &spec;
  tl_block_dim = spec.block;
  tl_grid_dim = spec.grid;
  char* smem = static_cast<char*>(spec.dynamic_smem_base());
  std::string error;
  for (unsigned z = 0; z < spec.grid.z && error.empty(); ++z) {
    for (unsigned y = 0; y < spec.grid.y && error.empty(); ++y) {
      for (unsigned x = 0; x < spec.grid.x && error.empty(); ++x) {
        tl_block_idx = {x, y, z};
        // Unwritten shared memory reads as NaN (0xFF bytes) in every float format; the canary past the end
        // catches writes beyond the launch's dynamic size.
        std::memset(smem, 0xFF, spec.dynamic_smem_bytes + kCanaryBytes);
        r.run_block();
        if (r.failed) {
          error = r.error;
          break;
        }
        for (size_t i = 0; i < kCanaryBytes; ++i) {
          if (static_cast<unsigned char>(smem[spec.dynamic_smem_bytes + i]) != 0xFF) {
            error = "CUDA emulation: " + r.where(-1) + ": dynamic shared memory written past its end (" +
                    std::to_string(spec.dynamic_smem_bytes) + " bytes requested at launch, byte " +
                    std::to_string(spec.dynamic_smem_bytes + i) + " changed)";
            break;
          }
        }
      }
    }
  }
  r.spec = nullptr;
  r.current = -1;
  tl_thread_idx = {0, 0, 0};
  TORCH_CHECK(error.empty(), error);
}

// ---------------------------------------------------------------------------------------------------------------
// Registration of the emulated host functions (cuda_emulation.h, TORCH_LIBRARY_IMPL).

torch::Library& SuffixedImpl::library() {
  static torch::Library* lib =
      new torch::Library(torch::Library::IMPL, "torchnova", c10::DispatchKey::CPU, __FILE__, __LINE__);
  return *lib;
}

}  // namespace torchnova_emu

// ---------------------------------------------------------------------------------------------------------------
// -fsanitize=alignment,bounds handlers. The emulated kernels are compiled with these checks (setup.py); GCC calls
// these functions on a misaligned access (e.g. a 16-byte vector load from an address that is not 16-byte
// aligned) or an out-of-bounds index into an array of known size (static __shared__ arrays, register arrays).
// Defined here instead of linking libubsan, so that a check failing inside a kernel becomes an error naming the
// kernel, block, thread and source line rather than a message on stderr.
namespace {
struct SourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct TypeDescriptor {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct TypeMismatchData {
  SourceLocation location;
  const TypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char type_check_kind;
};
struct OutOfBoundsData {
  SourceLocation location;
  const TypeDescriptor* array_type;
  const TypeDescriptor* index_type;
};

std::string at_source(const SourceLocation& loc) {
  return std::string(loc.file ? loc.file : "?") + ":" + std::to_string(loc.line) + ":" + std::to_string(loc.column);
}

[[noreturn]] void type_mismatch(TypeMismatchData* data, uintptr_t pointer) {
  static const char* const kKinds[] = {"load of",          "store to",
                                       "reference binding to", "member access within",
                                       "member call on",   "constructor call on",
                                       "downcast of",      "downcast of",
                                       "upcast of",        "cast to virtual base of",
                                       "_Nonnull binding to", "dynamic operation on"};
  const char* kind = data->type_check_kind < sizeof(kKinds) / sizeof(kKinds[0]) ? kKinds[data->type_check_kind]
                                                                                  : "access to";
  std::ostringstream s;
  if (pointer == 0) {
    s << kind << " a null pointer of type " << data->type->name;
  } else {
    s << "misaligned " << kind << " address 0x" << std::hex << pointer << std::dec << " of type " << data->type->name
      << ", which needs " << (1u << data->log_alignment) << "-byte alignment";
  }
  s << " at " << at_source(data->location);
  torchnova_emu::device_error(s.str());
}

[[noreturn]] void out_of_bounds(OutOfBoundsData* data, uintptr_t index) {
  std::ostringstream s;
  const TypeDescriptor* it = data->index_type;
  const bool is_signed = it->kind == 0 && (it->info & 1);
  const unsigned bits = it->kind == 0 ? 1u << (it->info >> 1) : 64;
  s << "index ";
  if (bits <= 64) {
    if (is_signed) {
      int64_t v = int64_t(index);
      if (bits < 64) v = int64_t(uint64_t(index) << (64 - bits)) >> (64 - bits);
      s << v;
    } else {
      s << uint64_t(index);
    }
  }
  s << " out of bounds for type " << data->array_type->name << " at " << at_source(data->location);
  torchnova_emu::device_error(s.str());
}
}  // namespace

#define TORCHNOVA_UBSAN_HANDLER extern "C" __attribute__((visibility("hidden"), noinline))
TORCHNOVA_UBSAN_HANDLER void __ubsan_handle_type_mismatch_v1(TypeMismatchData* data, uintptr_t pointer) {
  type_mismatch(data, pointer);
}
TORCHNOVA_UBSAN_HANDLER void __ubsan_handle_type_mismatch_v1_abort(TypeMismatchData* data, uintptr_t pointer) {
  type_mismatch(data, pointer);
}
TORCHNOVA_UBSAN_HANDLER void __ubsan_handle_out_of_bounds(OutOfBoundsData* data, uintptr_t index) {
  out_of_bounds(data, index);
}
TORCHNOVA_UBSAN_HANDLER void __ubsan_handle_out_of_bounds_abort(OutOfBoundsData* data, uintptr_t index) {
  out_of_bounds(data, index);
}
