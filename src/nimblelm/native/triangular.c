/* Batched unit-lower-triangular solves: the delta rule's chunkwise (WY / UT) form solves
 * (I + L) X = R for one [C, C] matrix per chunk and head, and its backward the transposed
 * system. LAPACK's trsm handles one small matrix per call at a few GFLOP/s; here each row is
 * an accumulation over the rows already solved, vectorised across the right-hand sides: two
 * rows x four 32-byte vectors of columns stay in registers (triangular.inc), one pass per
 * matrix.
 *
 * Layouts (contiguous, row-major): L [n, C, C], strictly lower (its diagonal and upper
 * triangle are never read); the right-hand sides R and the solution X [n, C, W] (R == X
 * solves in place; otherwise they must not overlap). Every kernel handles the matrices
 * [m0, m1) so callers can split the batch across threads.
 *
 * Every kernel exists for float and double (`_f32` / `_f64`): triangular.inc is included
 * once per type.
 */

#include <stdint.h>
#include <string.h>

int nl_triangular_abi(void) { return 2; }

#define REAL float
#define SFX(name) name##_f32
typedef float vec_f32 __attribute__((vector_size(32)));
#define VEC vec_f32
#define VL 8
#include "triangular.inc"
#undef REAL
#undef SFX
#undef VEC
#undef VL

#define REAL double
#define SFX(name) name##_f64
typedef double vec_f64 __attribute__((vector_size(32)));
#define VEC vec_f64
#define VL 4
#include "triangular.inc"
