#!/bin/sh
# Full decode sweep (writes results/decode_*.txt).  ~30-60 min on a shared 2-core box.
cd "$(dirname "$0")"
S1=a_take,a_index,b_dslice,b_gather,c_mulred,c_mulred_t,d_unrolled,d_unrolled_idx,e_cond,e_cond_xs,f_dense,f_dense_bat,f_dense_bat_unrolled,g_fused13,g_torch_layout,g_uniq,g_uniq_t,g_pairs_fori,g_while_layers,g_map_layers,i_ffi
S16=a_index,b_dslice,e_cond,e_cond_xs,f_dense_bat,g_fused13,g_torch_layout,g_uniq,g_uniq_t,g_pairs_fori,i_ffi
L1=h_list_switch,h_list_cond,h_list13_switch,h_list13_fori,h_scan_switch
L1_16=h_list_cond,h_list13_switch,h_list13_fori,h_scan_switch
L2=h_list_cond_t,h_layer_dense,h_scan_cond_t
python decode_moe.py --B 1,4 --variants $S1 > results/decode_stacked_B1_B4.txt 2>&1
python decode_moe.py --B 16 --variants $S16 --reps 5 > results/decode_stacked_B16.txt 2>&1
python decode_moe.py --B 1,4 --variants $L1 > results/decode_list_B1_B4.txt 2>&1
python decode_moe.py --B 16 --variants $L1_16 --reps 5 > results/decode_list_B16.txt 2>&1
python decode_moe.py --B 1,4,16 --variants $L2 --reps 5 > results/decode_list2.txt 2>&1
echo done > results/decode_done
