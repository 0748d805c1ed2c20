/* A dot product summed in a given order: `ops` is the postfix program of the summation tree (codegen/hostorder.py
 * measures the host BLAS's tree): k >= 0 pushes the rounded product a[k] * b[k]; MT_TREE_FMA + k replaces the top t by
 * fma(a[k], b[k], t); MT_TREE_ADD pops the top and adds it to the new top. The left operand is float32, or int8
 * features (x[k] - x.zero) * x.scale computed on the fly. */
#include "mt_runtime.h"

#define LEAF(k) (x8 ? (float)((int32_t)x8[k] - xz) * xs * b[(k) * bs] : a[k] * b[(k) * bs])
#define LEFT(k) (x8 ? (float)((int32_t)x8[k] - xz) * xs : a[k])

static float run(const float *a, const int8_t *x8, int32_t xz, float xs, const float *b, int32_t bs,
                 const mt_tree *t) {
  float stack[MT_TREE_STACK];
  int32_t top = -1;
  for (int32_t i = 0; i < t->n; i++) {
    const int32_t op = t->ops[i];
    if (op == MT_TREE_ADD) {
      top--;
      stack[top] = stack[top] + stack[top + 1];
    } else if (op >= MT_TREE_FMA) {
      const int32_t k = op - MT_TREE_FMA;
      stack[top] = mt_fma(LEFT(k), b[k * bs], stack[top]);
    } else {
      stack[++top] = LEAF(op);
    }
  }
  return stack[0];
}

float mt_dot_tree(const float *a, const float *b, int32_t bs, const mt_tree *t) { return run(a, 0, 0, 0, b, bs, t); }

float mt_dot_tree_q8(const int8_t *x, int32_t x_zero, float x_scale, const float *b, int32_t bs, const mt_tree *t) {
  return run(0, x, x_zero, x_scale, b, bs, t);
}
