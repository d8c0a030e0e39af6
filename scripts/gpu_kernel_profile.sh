#!/usr/bin/env bash
# Kernel profiling on the GPU machine (device tool): builds the standalone check harness, times the
# harness (every case; the timed Qwen2.5-VL-7B-shaped ones at 1K-32K context), and runs Nsight Compute on one launch of the
# kernel named by KERNEL (a regex, default the row-pair kernel). Logs go to $OUT (or /tmp/gpu-out). Usage: bash scripts/gpu_kernel_profile.sh [FILTER]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
filter=${1:-qwen7b_ctx8192_b16 rope=bf16 latent=bf16}
# The wgmma descriptor probe first: its verdict on the accumulation operand's strides goes into the build.
mn_flags=""
if [ -f bench/cuda/wgmma_probe.cu ]; then
  nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a -o /tmp/wgmma_probe bench/cuda/wgmma_probe.cu > /dev/null 2>&1 \
    && timeout 60 /tmp/wgmma_probe | tee "$out/probe.log"
  mn_flags=$(grep "^MN_DESC" "$out/probe.log" | head -1 | cut -d' ' -f2-)
fi
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -DMLAFORGE_CUDA_SM90A $mn_flags -Xptxas -v -Isrc -o /tmp/mla_check bench/cuda/mla_decode_check.cu \
  src/kernels/cuda/mla_decode.cu > "$out/ptxas.log" 2>&1 || { tail -40 "$out/ptxas.log"; exit 1; }
grep -A4 "Function properties for.*rowpair" "$out/ptxas.log" | grep -E "registers|spill"
cuobjdump -sass /tmp/mla_check > /tmp/all.sass 2>&1
awk '/Function : .*rowpair_kernelILi4ELi128ELi128ELb1/{on=1} on&&/Function : /&&!/rowpair_kernelILi4ELi128ELi128ELb1/{on=0} on' /tmp/all.sass > "$out/rowpair4.sass"
timeout 300 /tmp/mla_check > "$out/times.log" 2>&1; echo "check rc=$?"; grep -E "FAIL| us |runs failed|^device" "$out/times.log"
timeout 240 ncu --clock-control none --kernel-name regex:"${KERNEL:-mla_decode_rowpair}" --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
  --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis \
  --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio,smsp__average_warps_issue_stalled_membar_per_issue_active.ratio,smsp__average_warps_issue_stalled_drain_per_issue_active.ratio,smsp__average_warps_issue_stalled_imc_miss_per_issue_active.ratio,smsp__average_warps_issue_stalled_tex_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio \
  /tmp/mla_check --filter "$filter" > "$out/ncu.log" 2>&1
echo "ncu rc=$?"
grep -E "mla_decode_rowpair|mla_combine|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Stall|Warp Cycles Per Issued|Issued Ipc|No Eligible|Dynamic Shared|Waves Per SM|Grid Size|L2 Hit|Mem Busy|Max Bandwidth|Compute \(SM\)|stalled|pipe|inst_executed" "$out/ncu.log" | head -80
