"""benchmarks/sm90_resources.py's loop counts: a backward branch closes a loop; its size and the
spill instructions inside it are counted (the per-tile cost the session-11 changes were found by)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sm90_resources", ROOT / "benchmarks" / "sm90_resources.py")
sm90 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm90)

# The shape of `cuobjdump -sass` output: an address comment, the instruction, its encoding.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;      /* 0x000000030200720c */
        /*0020*/              @P0 BRA 0x90 ;                              /* 0x0000006000000947 */
        /*0030*/                   FFMA R4, R4, R5, R6 ;                  /* 0x0000000504047223 */
        /*0040*/                   STL [R1+0x4], R4 ;                     /* 0x0000040401007387 */
        /*0050*/                   LDL.LU R7, [R1+0x4] ;                  /* 0x0000040001077983 */
        /*0060*/                   MUFU.EX2 R8, R7 ;                      /* 0x0000000700087308 */
        /*0070*/              @!P1 BRA 0x30 ;                             /* 0xffffffb000009947 */
        /*0080*/                   FADD R9, R9, R8 ;                      /* 0x0000000809097221 */
        /*0090*/                   EXIT ;                                 /* 0x000000000000794d */
        /*00a0*/                   BRA 0xa0;                              /* 0xfffffffc00fc7947 */
"""


def test_a_backward_branch_closes_a_loop_and_its_spills_are_counted():
    loops = sm90.sass_loops(SASS)
    assert loops == [{"start": 0x30, "end": 0x70, "instructions": 5, "spills": 2}]


def test_no_loop_in_straight_code():
    assert sm90.sass_loops(SASS.split("/*0030*/")[0]) == []
