"""Tests for lightning_ntk.spectral against closed forms and independent float64 brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_ntk import spectral as sp


# ------------------------------------------------------------------------ helpers
def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _psd(n: int, p: int, seed: int = 0) -> np.ndarray:
    phi = _rng(seed).standard_normal((n, p))
    return phi @ phi.T


def _full_from_matrix(A: np.ndarray, n1: int, n2: int, c: int) -> np.ndarray:
    """(N1*C, N2*C) matrix -> (N1, N2, C, C) kernel by explicit loops, row n*C + c."""
    K = np.empty((n1, n2, c, c))
    for n in range(n1):
        for m in range(n2):
            for a in range(c):
                for b in range(c):
                    K[n, m, a, b] = A[n * c + a, m * c + b]
    return K


def _one_hot(labels, c: int) -> np.ndarray:
    out = np.zeros((len(labels), c))
    for i, y in enumerate(labels):
        out[i, y] = 1.0
    return out


def _fort_distance(K1: np.ndarray, K2: np.ndarray) -> float:
    """Fort et al.'s formula written with traces on the matrix form."""
    A, B = K1.reshape(K1.shape[0], -1), K2.reshape(K2.shape[0], -1)
    return 1.0 - np.trace(A @ B.T) / math.sqrt(np.trace(A @ A.T) * np.trace(B @ B.T))


# ----------------------------------------------------------------- kernel matrix
def test_kernel_matrix_full_ordering_matches_loops():
    A = _rng(1).standard_normal((3 * 4, 2 * 4))
    K4 = _full_from_matrix(A, 3, 2, 4)
    np.testing.assert_array_equal(sp.kernel_matrix(K4), A)


def test_kernel_matrix_diagonal_is_block_diagonal_in_logits():
    K3 = _rng(2).standard_normal((3, 2, 4))
    M = sp.kernel_matrix(K3)
    for n in range(3):
        for m in range(2):
            for a in range(4):
                for b in range(4):
                    want = K3[n, m, a] if a == b else 0.0
                    assert M[n * 4 + a, m * 4 + b] == want


def test_kernel_matrix_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        sp.kernel_matrix(np.ones(5))
    with pytest.raises(ValueError, match="last two axes"):
        sp.kernel_matrix(np.ones((2, 2, 3, 4)))


def test_trace_and_frobenius_closed_forms():
    K2 = np.array([[2.0, 1.0], [1.0, 3.0]])
    assert sp.kernel_trace(K2) == 5.0
    assert sp.kernel_frobenius_norm(K2) == pytest.approx(math.sqrt(4 + 1 + 1 + 9))
    K3 = np.zeros((2, 2, 3))
    K3[0, 0] = [1, 2, 3]
    K3[1, 1] = [4, 5, 6]
    K3[0, 1] = [100, 100, 100]  # off-diagonal examples do not enter the trace
    assert sp.kernel_trace(K3) == 21.0
    K4 = _full_from_matrix(_psd(6, 8, seed=3), 2, 2, 3)
    assert sp.kernel_trace(K4) == pytest.approx(np.trace(_psd(6, 8, seed=3)))
    assert sp.kernel_frobenius_norm(K4) == pytest.approx(np.linalg.norm(_psd(6, 8, seed=3)))


def test_nngp_kernel_matches_loops_and_cross():
    rng = _rng(4)
    f1 = rng.standard_normal((5, 2, 3))  # flattened to d = 6
    f2 = rng.standard_normal((4, 6))
    K = sp.nngp_kernel(f1)
    K12 = sp.nngp_kernel(f1, f2)
    g1 = f1.reshape(5, 6)
    for i in range(5):
        for j in range(5):
            assert K[i, j] == pytest.approx(sum(g1[i, t] * g1[j, t] for t in range(6)) / 6)
        for j in range(4):
            assert K12[i, j] == pytest.approx(sum(g1[i, t] * f2[j, t] for t in range(6)) / 6)
    with pytest.raises(ValueError, match="same layer"):
        sp.nngp_kernel(f1, rng.standard_normal((4, 5)))


# ------------------------------------------------------------ distance / velocity
@pytest.mark.parametrize("c", [1e-3, 1.0, 7.5, 1e6])
def test_distance_zero_for_positive_multiple(c):
    K = _psd(8, 5)
    assert sp.kernel_distance(K, c * K) == pytest.approx(0.0, abs=1e-14)


def test_distance_symmetric_in_unit_interval_and_matches_trace_formula():
    for seed in range(30):
        K1 = _psd(7, 3, seed=seed)
        K2 = _psd(7, 4, seed=seed + 100)
        s12, s21 = sp.kernel_distance(K1, K2), sp.kernel_distance(K2, K1)
        assert s12 == pytest.approx(s21, abs=1e-15)
        assert 0.0 <= s12 <= 1.0
        assert s12 == pytest.approx(_fort_distance(K1, K2), abs=1e-12)


def test_distance_one_for_orthogonal_psd_kernels():
    u = np.array([1.0, 1.0, 0.0, 0.0])
    v = np.array([1.0, -1.0, 2.0, 0.0])  # u . v = 0, so <uu^T, vv^T> = (u.v)^2 = 0
    assert sp.kernel_distance(np.outer(u, u), np.outer(v, v)) == pytest.approx(1.0, abs=1e-15)
    K1 = np.diag([1.0, 2.0, 0.0, 0.0])
    K2 = np.diag([0.0, 0.0, 3.0, 1.0])
    assert sp.kernel_distance(K1, K2) == pytest.approx(1.0, abs=1e-15)


def test_distance_hand_value():
    # <I_2-ish, diag(1,0)> = 1, norms 1 and sqrt(2): S = 1 - 1/sqrt(2)
    assert sp.kernel_distance(np.diag([1.0, 0.0]), np.eye(2)) == pytest.approx(1 - 1 / math.sqrt(2))


def test_distance_small_values_are_accurate():
    K = _psd(6, 6)
    D = _rng(9).standard_normal((6, 6))
    K2 = K + 1e-7 * (D + D.T)
    # Reference in extended precision on the cosine.
    a, b = K.ravel(), K2.ravel()
    ref = 1 - np.longdouble(a @ b) / np.sqrt(np.longdouble(a @ a) * np.longdouble(b @ b))
    s = sp.kernel_distance(K, K2)
    assert s > 0
    assert s == pytest.approx(float(ref), rel=1e-3)


@pytest.mark.parametrize("shape", [(4, 4, 3), (4, 4, 3, 3)])
def test_distance_other_kinds_flatten(shape):
    rng = _rng(5)
    K1, K2 = rng.standard_normal(shape), rng.standard_normal(shape)
    a, b = K1.ravel(), K2.ravel()
    want = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert sp.kernel_distance(K1, K2) == pytest.approx(want, abs=1e-12)


def test_distance_errors():
    with pytest.raises(ValueError, match="same shape"):
        sp.kernel_distance(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match="zero kernel"):
        sp.kernel_distance(np.zeros((3, 3)), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        sp.kernel_distance(np.full((2, 2), np.nan), np.eye(2))


def test_velocity_and_errors():
    K1, K2 = np.diag([1.0, 0.0]), np.eye(2)
    assert sp.kernel_velocity(K1, K2, 0.25) == pytest.approx((1 - 1 / math.sqrt(2)) / 0.25)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="dt_epochs"):
            sp.kernel_velocity(K1, K2, bad)


def test_distance_trajectory_against_pairwise_formula():
    kernels = [_psd(5, 3, seed=s) for s in range(4)]
    epochs = [0.0, 0.5, 2.0, 3.0]
    out = sp.kernel_distance_trajectory(np.stack(kernels), epochs)
    for t in range(4):
        assert out.distance_to_init[t] == pytest.approx(_fort_distance(kernels[0], kernels[t]), abs=1e-12)
    assert math.isnan(out.distance_to_prev[0]) and math.isnan(out.velocity[0])
    for t in range(1, 4):
        d = _fort_distance(kernels[t - 1], kernels[t])
        assert out.distance_to_prev[t] == pytest.approx(d, abs=1e-12)
        assert out.velocity[t] == pytest.approx(d / (epochs[t] - epochs[t - 1]), abs=1e-12)
    with pytest.raises(ValueError, match="strictly increasing"):
        sp.kernel_distance_trajectory(kernels[:2], [1.0, 1.0])
    with pytest.raises(ValueError, match="epochs"):
        sp.kernel_distance_trajectory(kernels[:2], [1.0])


# ------------------------------------------------------------------------ alignment
def test_alignment_one_for_ideal_kernel_labels_and_one_hot():
    labels = np.array([0, 2, 1, 2, 0, 1, 1])
    Y = _one_hot(labels, 3)
    K = Y @ Y.T
    assert sp.kernel_target_alignment(K, labels) == pytest.approx(1.0, abs=1e-15)
    assert sp.kernel_target_alignment(K, Y) == pytest.approx(1.0, abs=1e-15)
    assert sp.kernel_target_alignment(K, Y, centered=True) == pytest.approx(1.0, abs=1e-15)


def test_alignment_hand_value():
    # <I, YY^T> = 4, ||I|| = 2, ||YY^T|| = sqrt(8): A = 1/sqrt(2)
    assert sp.kernel_target_alignment(np.eye(4), [0, 0, 1, 1]) == pytest.approx(1 / math.sqrt(2))


def test_alignment_against_explicit_matrices():
    rng = _rng(6)
    K = _psd(9, 4, seed=6)
    labels = rng.integers(0, 3, size=9)
    labels[:3] = [0, 1, 2]
    Y = _one_hot(labels, 3)
    T = Y @ Y.T
    want = np.trace(K @ T) / (np.linalg.norm(K) * np.linalg.norm(T))
    assert sp.kernel_target_alignment(K, labels) == pytest.approx(want, rel=1e-12)
    H = np.eye(9) - np.ones((9, 9)) / 9
    Kc, Tc = H @ K @ H, H @ T @ H
    want_c = np.trace(Kc @ Tc) / (np.linalg.norm(Kc) * np.linalg.norm(Tc))
    assert sp.kernel_target_alignment(K, labels, centered=True) == pytest.approx(want_c, rel=1e-12)


def test_centered_alignment_invariant_to_constant_feature_shift():
    rng = _rng(7)
    phi = rng.standard_normal((10, 4))
    shift = 5.0 * rng.standard_normal(4)
    labels = np.arange(10) % 3
    K = phi @ phi.T
    K_shift = (phi + shift) @ (phi + shift).T
    a = sp.kernel_target_alignment(K, labels, centered=True)
    b = sp.kernel_target_alignment(K_shift, labels, centered=True)
    assert a == pytest.approx(b, rel=1e-10)
    # The uncentred alignment does move (so the test above can fail).
    assert abs(sp.kernel_target_alignment(K, labels) - sp.kernel_target_alignment(K_shift, labels)) > 1e-2


def test_full_kernel_alignment_ideal_and_centered_explicit():
    n, c = 5, 3
    labels = np.array([0, 1, 2, 1, 0])
    Y = _one_hot(labels, c)
    y = Y.reshape(-1)
    K_ideal = _full_from_matrix(np.outer(y, y), n, n, c)
    assert sp.kernel_target_alignment(K_ideal, labels) == pytest.approx(1.0, abs=1e-15)
    A = _psd(n * c, 7, seed=8)
    K4 = _full_from_matrix(A, n, n, c)
    T = np.outer(y, y)
    want = np.sum(A * T) / (np.linalg.norm(A) * np.linalg.norm(T))
    assert sp.kernel_target_alignment(K4, Y) == pytest.approx(want, rel=1e-12)
    H = np.kron(np.eye(n) - np.ones((n, n)) / n, np.eye(c))
    Ac, Tc = H @ A @ H, H @ T @ H
    want_c = np.sum(Ac * Tc) / (np.linalg.norm(Ac) * np.linalg.norm(Tc))
    assert sp.kernel_target_alignment(K4, Y, centered=True) == pytest.approx(want_c, rel=1e-12)


def test_diagonal_kernel_alignment_uses_logit_diagonal_target():
    n, c = 4, 2
    rng = _rng(10)
    K3 = np.abs(rng.standard_normal((n, n, c)))
    Y = _one_hot([0, 1, 1, 0], c)
    T = np.zeros((n, n, c))
    for i in range(n):
        for j in range(n):
            for a in range(c):
                T[i, j, a] = Y[i, a] * Y[j, a]
    want = np.sum(K3 * T) / (np.linalg.norm(K3) * np.linalg.norm(T))
    assert sp.kernel_target_alignment(K3, Y) == pytest.approx(want, rel=1e-12)


def test_alignment_errors():
    with pytest.raises(ValueError, match="rows"):
        sp.kernel_target_alignment(np.eye(3), [0, 1])
    with pytest.raises(ValueError, match="integer class labels"):
        sp.kernel_target_alignment(np.eye(2), [0.5, 1.0])
    with pytest.raises(ValueError, match="target kernel"):
        sp.kernel_target_alignment(_psd(3, 3), [1, 1, 1], centered=True)
    with pytest.raises(ValueError, match=r"\(N, N, \.\.\.\)"):
        sp.kernel_target_alignment(np.ones((3, 2)), [0, 1, 0])


# ----------------------------------------------------------------------- eigenpairs
def test_top_eigenpairs_against_numpy():
    K = _psd(12, 6, seed=11)
    w_all = np.sort(np.linalg.eigvalsh(K))[::-1]
    w, U = sp.top_eigenpairs(K, 4)
    np.testing.assert_allclose(w, w_all[:4], rtol=1e-10)
    np.testing.assert_allclose(K @ U, U * w, atol=1e-9)
    np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-12)
    # sign convention: the largest-magnitude entry of each column is positive
    for j in range(4):
        assert U[np.argmax(np.abs(U[:, j])), j] > 0
    w_full, U_full = sp.top_eigenpairs(K)
    assert U_full.shape == (12, 12)
    np.testing.assert_allclose(w_full, w_all, atol=1e-10)


def test_top_eigenpairs_full_kernel_uses_documented_ordering():
    n, c = 4, 3
    A = _psd(n * c, 5, seed=12)
    K4 = _full_from_matrix(A, n, n, c)
    w, U = sp.top_eigenpairs(K4, 3)
    np.testing.assert_allclose(A @ U, U * w, atol=1e-9)
    np.testing.assert_allclose(w, np.sort(np.linalg.eigvalsh(A))[::-1][:3], rtol=1e-10)


def test_top_eigenpairs_errors():
    with pytest.raises(ValueError, match="k must be"):
        sp.top_eigenpairs(np.eye(3), 4)
    with pytest.raises(ValueError, match="k must be"):
        sp.top_eigenpairs(np.eye(3), 0)
    with pytest.raises(ValueError, match="not symmetric"):
        sp.top_eigenpairs(np.array([[1.0, 2.0], [0.0, 1.0]]), 1)


def test_align_signs_dot_restores_flipped_columns():
    _, U = sp.top_eigenpairs(_psd(8, 8, seed=13), 5)
    flips = np.array([1.0, -1.0, -1.0, 1.0, -1.0])
    np.testing.assert_array_equal(sp.align_signs(U * flips, U), U)


def test_align_signs_max_overlap_handles_reordering():
    _, U = sp.top_eigenpairs(_psd(8, 8, seed=14), 4)
    perm = [1, 0, 3, 2]
    flips = np.array([-1.0, 1.0, -1.0, -1.0])
    V = U[:, perm] * flips
    out = sp.align_signs(V, U, method="max_overlap")
    np.testing.assert_array_equal(out, U[:, perm])
    with pytest.raises(ValueError, match="method"):
        sp.align_signs(V, U, method="nearest")
    with pytest.raises(ValueError, match="max_overlap"):
        sp.align_signs(V[:, :3], U)


# --------------------------------------------------------------------- effective rank
def test_effective_rank_closed_forms():
    assert sp.effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert sp.effective_rank([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert sp.effective_rank([2.0, 2.0, 0.0, -1e-17]) == pytest.approx(2.0)
    p = (0.75, 0.25)
    assert sp.effective_rank([3.0, 1.0]) == pytest.approx(math.exp(-(p[0] * math.log(p[0]) + p[1] * math.log(p[1]))))
    with pytest.raises(ValueError, match="positive"):
        sp.effective_rank([0.0, -1.0])


# --------------------------------------------------------------------------- energies
def test_energy_baselines_hand_computed_and_by_definition():
    # balanced one-hot labels: 1/C in the constant direction
    assert sp.energy_baselines(np.arange(12) % 3).constant == pytest.approx(1 / 3)
    # unbalanced: sum of squared class fractions, (3/4)^2 + (1/4)^2
    assert sp.energy_baselines(np.array([0, 0, 0, 1])).constant == pytest.approx(10 / 16)
    labels = np.array([0, 0, 1, 2, 2, 2, 1, 0, 2])
    Y = _one_hot(labels, 3)
    n = len(labels)
    base = sp.energy_baselines(labels, num_rows=n, k=4)
    # definition, (N, N) kernel: the target energy in the constant unit vector
    ones = np.full((n, 1), 1 / np.sqrt(n))
    assert base.constant == pytest.approx(float(sp.eigen_energy(ones, Y)[0]), rel=1e-12)
    # full kernel (rows n*C + c): the energy of vec(Y) in the C constant-per-output directions
    U = np.kron(np.full((n, 1), 1 / np.sqrt(n)), np.eye(3))  # (N*C, C), column c = 1_N (x) e_c / sqrt(N)
    assert base.constant == pytest.approx(float(sp.eigen_energy(U, Y.reshape(-1))[-1]), rel=1e-12)
    # random k-subspace: mean energy of a fixed vector over random orthonormal U is k/M
    rng = _rng(31)
    m, k = 12, 4
    phi = rng.standard_normal(m)
    draws = np.array([sp.eigen_energy(np.linalg.qr(rng.standard_normal((m, k)))[0], phi) for _ in range(3000)])
    expected = sp.energy_baselines(np.eye(3)[np.arange(m) % 3], num_rows=m, k=k).random
    np.testing.assert_allclose(expected, np.arange(1, k + 1) / m)
    se = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - expected) < 4 * se)
    with pytest.raises(ValueError, match="zero"):
        sp.energy_baselines(np.zeros((3, 2)))


def test_energy_curve_monotone_and_one_at_full_rank():
    K = _psd(10, 10, seed=15)
    _, U = sp.top_eigenpairs(K)
    phi = _rng(15).standard_normal((10, 3))
    curve = sp.eigen_energy(U, phi)
    assert curve.shape == (10,)
    assert np.all(np.diff(curve) >= -1e-15)
    assert curve[-1] == pytest.approx(1.0, abs=1e-12)
    # brute force: per-column squared projections summed, over ||phi||_F^2
    for k in (1, 4, 10):
        num = sum(float(U[:, j] @ phi[:, col]) ** 2 for j in range(k) for col in range(3))
        assert curve[k - 1] == pytest.approx(num / np.sum(phi**2), rel=1e-12)
    np.testing.assert_allclose(sp.eigen_energy(U, phi, ks=[1, 4, 10]), curve[[0, 3, 9]])


def test_energy_hand_values():
    U = np.eye(4)
    assert sp.eigen_energy(U, np.array([1.0, 1.0, 0.0, 0.0])).tolist() == [0.5, 1.0, 1.0, 1.0]
    assert sp.eigen_energy(U, np.array([0.0, 0.0, 3.0, 4.0])).tolist() == pytest.approx([0, 0, 9 / 25, 1])
    with pytest.raises(ValueError, match="zero"):
        sp.eigen_energy(U, np.zeros(4))
    with pytest.raises(ValueError, match="ks"):
        sp.eigen_energy(U, np.ones(4), ks=[0])


def test_target_output_residual_energy_helpers():
    K = _psd(6, 3, seed=16)
    _, U = sp.top_eigenpairs(K, 3)
    labels = np.array([0, 1, 2, 0, 1, 2])
    Y = _one_hot(labels, 3)
    out = _rng(16).standard_normal((6, 3))
    np.testing.assert_allclose(sp.target_energy(U, labels), sp.eigen_energy(U, Y))
    np.testing.assert_allclose(sp.output_energy(U, out), sp.eigen_energy(U, out))
    np.testing.assert_allclose(sp.residual_energy(U, out, labels), sp.eigen_energy(U, out - Y))
    np.testing.assert_allclose(sp.residual_energy(U, out, Y), sp.eigen_energy(U, out - Y))


def test_energy_full_kernel_reads_vec():
    n, c = 4, 3
    A = _psd(n * c, 12, seed=17)
    _, U = sp.top_eigenpairs(_full_from_matrix(A, n, n, c))
    phi = _rng(17).standard_normal((n, c))
    vec = np.array([phi[i, a] for i in range(n) for a in range(c)])
    np.testing.assert_allclose(sp.eigen_energy(U, phi), sp.eigen_energy(U, vec), rtol=1e-12)
    labels = np.array([2, 0, 1, 0])
    y = _one_hot(labels, c)
    yvec = np.array([y[i, a] for i in range(n) for a in range(c)])
    np.testing.assert_allclose(sp.target_energy(U, labels), sp.eigen_energy(U, yvec), rtol=1e-12)
    assert sp.target_energy(U, labels)[-1] == pytest.approx(1.0)


# ---------------------------------------------------------------- subspace overlap
def test_subspace_overlap_rotation_orthogonal_and_partial():
    _, U = sp.top_eigenpairs(_psd(9, 9, seed=18), 9)
    theta = 0.7
    R = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    U1 = U[:, :2]
    assert sp.subspace_overlap(U1, U1 @ R) == pytest.approx(1.0, abs=1e-12)
    assert sp.subspace_overlap(U1, U[:, 2:4]) == pytest.approx(0.0, abs=1e-12)
    e = np.eye(4)
    assert sp.subspace_overlap(e[:, [0, 1]], e[:, [0, 2]]) == pytest.approx(0.5)
    assert sp.subspace_overlap(e[:, [0, 1, 3]], e[:, [0, 2]], k=1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="pass k"):
        sp.subspace_overlap(e[:, :3], e[:, :2])


# ------------------------------------------------------------------------- Nyström
def test_nystrom_reproduces_eigenvectors_on_probe():
    K = _psd(10, 6, seed=19)
    w, U = sp.top_eigenpairs(K, 5)
    np.testing.assert_allclose(sp.nystrom_extension(K, U, w), U, atol=1e-10)
    # probe rows inside a larger held-out set are reproduced too
    rng = _rng(19)
    phi = rng.standard_normal((10, 6))
    K = phi @ phi.T
    w, U = sp.top_eigenpairs(K, 4)
    new = rng.standard_normal((3, 6))
    X_star = np.vstack([new, phi[[2, 7]]])
    ext = sp.nystrom_extension(X_star @ phi.T, U, w)
    np.testing.assert_allclose(ext[3:], U[[2, 7]], atol=1e-10)


def test_nystrom_equals_linear_eigenfunction_for_linear_kernel():
    # K = Phi Phi^T: u_j = Phi v_j / s_j (SVD Phi = S diag(s) V^T), lambda_j = s_j^2, so the
    # extension is x -> x . v_j / s_j, a closed form independent of the kernel eigensolver.
    rng = _rng(20)
    phi = rng.standard_normal((12, 5))
    _, s, Vt = np.linalg.svd(phi, full_matrices=False)
    w, U = sp.top_eigenpairs(phi @ phi.T, 5)
    U = sp.align_signs(U, (phi @ Vt.T) / s, method="dot")
    new = rng.standard_normal((4, 5))
    ext = sp.nystrom_extension(new @ phi.T, U, w)
    np.testing.assert_allclose(ext, (new @ Vt.T) / s, atol=1e-10)


def test_nystrom_full_kernel_shape_and_probe():
    n, c = 3, 2
    A = _psd(n * c, 6, seed=21)
    K4 = _full_from_matrix(A, n, n, c)
    w, U = sp.top_eigenpairs(K4, 4)
    np.testing.assert_allclose(sp.nystrom_extension(K4, U, w), U, atol=1e-10)


def test_nystrom_refuses_tiny_eigenvalues():
    phi = _rng(22).standard_normal((8, 3))
    w, U = sp.top_eigenpairs(phi @ phi.T, 5)  # eigenvalues 4, 5 are ~0
    with pytest.raises(ValueError, match=r"eigvals\[3\]"):
        sp.nystrom_extension(phi @ phi.T, U, w)
    with pytest.raises(ValueError, match="rows"):
        sp.nystrom_extension(np.ones((2, 7)), U[:, :3], w[:3])


# ------------------------------------------------------------------ kernel regression
def _brute_krr(K, Y, Ks, eps):
    n = K.shape[0]
    return Ks @ np.linalg.solve(K + eps * np.trace(K) / n * np.eye(n), Y)


def test_krr_matches_brute_force_and_interpolates_at_eps_zero():
    rng = _rng(23)
    phi = rng.standard_normal((10, 20))
    phi_t = rng.standard_normal((4, 20))
    K, Ks = phi @ phi.T, phi_t @ phi.T
    labels = np.arange(10) % 3
    Y = _one_hot(labels, 3)
    np.testing.assert_allclose(sp.kernel_regression(K, labels, K, eps=0.0), Y, atol=1e-9)
    for eps in (0.0, 1e-3, 0.3):
        np.testing.assert_allclose(
            sp.kernel_regression(K, labels, Ks, eps=eps), _brute_krr(K, Y, Ks, eps), rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("eps", [0.0, 1e-4, 0.5])
def test_krr_invariant_to_kernel_scale(eps):
    rng = _rng(24)
    phi = rng.standard_normal((8, 12))
    phi_t = rng.standard_normal((5, 12))
    K, Ks = phi @ phi.T, phi_t @ phi.T
    Y = rng.standard_normal((8, 2))
    base = sp.kernel_regression(K, Y, Ks, eps=eps)
    for c in (1e-4, 3.0, 1e5):
        np.testing.assert_allclose(sp.kernel_regression(c * K, Y, c * Ks, eps=eps), base, rtol=1e-8, atol=1e-12)


def test_krr_full_kernel_solves_vec_system():
    n, nt, c = 4, 3, 2
    rng = _rng(25)
    J = rng.standard_normal((n * c, 15))
    Jt = rng.standard_normal((nt * c, 15))
    A, As = J @ J.T, Jt @ J.T
    K4, Ks4 = _full_from_matrix(A, n, n, c), _full_from_matrix(As, nt, n, c)
    labels = np.array([0, 1, 1, 0])
    y = np.array([_one_hot(labels, c)[i, a] for i in range(n) for a in range(c)])
    eps = 1e-2
    ref_vec = As @ np.linalg.solve(A + eps * np.trace(A) / (n * c) * np.eye(n * c), y)
    ref = np.array([[ref_vec[i * c + a] for a in range(c)] for i in range(nt)])
    np.testing.assert_allclose(sp.kernel_regression(K4, labels, Ks4, eps=eps), ref, rtol=1e-9)
    np.testing.assert_allclose(sp.kernel_regression(K4, labels, K4, eps=0.0), _one_hot(labels, c), atol=1e-9)


def test_krr_diagonal_kernel_equals_embedded_full():
    n, nt, c = 5, 2, 3
    rng = _rng(26)
    K3 = np.stack([_psd(n + nt, 9, seed=30 + a) for a in range(c)], axis=-1)
    Ktr, Kte = K3[:n, :n], K3[n:, :n]
    embed = lambda K: np.einsum("nmc,cd->nmcd", K, np.eye(c))  # noqa: E731
    labels = rng.integers(0, c, size=n)
    for eps in (0.0, 0.1):
        np.testing.assert_allclose(
            sp.kernel_regression(Ktr, labels, Kte, eps=eps, num_classes=c),
            sp.kernel_regression(embed(Ktr), labels, embed(Kte), eps=eps),
            rtol=1e-9,
            atol=1e-12,
        )


def test_krr_target_mean_and_prior_outputs():
    rng = _rng(27)
    phi = rng.standard_normal((7, 10))
    phi_t = rng.standard_normal((3, 10))
    K, Ks = phi @ phi.T, phi_t @ phi.T
    Y = rng.standard_normal((7, 2))
    eps = 0.05
    mu = Y.mean(axis=0)
    np.testing.assert_allclose(
        sp.kernel_regression(K, Y, Ks, eps=eps, target_mean=True), mu + _brute_krr(K, Y - mu, Ks, eps), rtol=1e-9
    )
    with pytest.raises(TypeError):  # the old name, which meant the target mean, not Lee et al.'s centring
        sp.kernel_regression(K, Y, Ks, eps=eps, center=True)
    f0, f0t = rng.standard_normal((7, 2)), rng.standard_normal((3, 2))
    np.testing.assert_allclose(
        sp.kernel_regression(K, Y, Ks, eps=eps, f0_train=f0, f0_test=f0t),
        f0t + _brute_krr(K, Y - f0, Ks, eps),
        rtol=1e-9,
    )
    with pytest.raises(ValueError, match="both"):
        sp.kernel_regression(K, Y, Ks, f0_train=f0)


def _trained_linear_model(J, Y, f0, steps=6000):
    """Gradient descent on 0.5 ||f0 + J dw - Y||^2 from dw = 0 (the linearised network of
    Lee et al. 2019, f_lin = f0 + J (w - w0)), run to convergence; returns dw."""
    lr = 1.0 / np.linalg.eigvalsh(J @ J.T).max()
    dw = np.zeros((J.shape[1], Y.shape[1]))
    for _ in range(steps):
        dw -= lr * J.T @ (f0 + J @ dw - Y)
    return dw


def test_krr_default_is_lee_centred_network_and_f0_the_uncentred_one():
    # Lee et al. (2020) centre the network: f - f0 is trained, which is 0 at the snapshot.
    # Its linearisation J (w - w0) trained to convergence (eps = 0, N < P) predicts
    # K(X*, X) K^-1 Y: kernel_regression's default. The uncentred linearised network
    # f0 + J (w - w0) predicts f0(X*) + K* K^-1 (Y - f0(X)): what f0_train/f0_test give.
    rng = _rng(28)
    J, Js = rng.standard_normal((6, 15)), rng.standard_normal((3, 15))  # Jacobians, P = 15 > N = 6
    Y = rng.standard_normal((6, 2))
    f0, f0s = rng.standard_normal((6, 2)), rng.standard_normal((3, 2))
    K, Ks = J @ J.T, Js @ J.T
    centred = Js @ _trained_linear_model(J, Y, np.zeros_like(Y))
    np.testing.assert_allclose(sp.kernel_regression(K, Y, Ks, eps=0.0), centred, rtol=1e-6, atol=1e-8)
    uncentred = f0s + Js @ _trained_linear_model(J, Y, f0)
    np.testing.assert_allclose(sp.kernel_regression(K, Y, Ks, eps=0.0, f0_train=f0, f0_test=f0s), uncentred,
                               rtol=1e-6, atol=1e-8)
    assert np.abs(centred - uncentred).max() > 0.1  # the two conventions differ here


def test_krr_errors():
    indefinite = np.diag([1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="eps > 0"):
        sp.kernel_regression(indefinite, [0, 1, 0], indefinite, eps=0.0)
    with pytest.raises(ValueError, match="eps must be"):
        sp.kernel_regression(np.eye(3), [0, 1, 0], np.eye(3), eps=-1.0)
    with pytest.raises(ValueError, match="K_test_train"):
        sp.kernel_regression(np.eye(3), [0, 1, 0], np.ones((2, 4)))
    with pytest.raises(ValueError, match="Y_train"):
        sp.kernel_regression(np.eye(3), [0, 1], np.eye(3))


def test_krr_scores_closed_form():
    # K = I, test rows = training rows 0, 1, 2: prediction Y/(1+eps) (tr K/n = 1).
    labels = np.array([0, 1, 2, 1])
    Ks = np.eye(4)[:3]
    eps = 0.25
    scores = sp.kernel_regression_scores(np.eye(4), labels, Ks, labels[:3], eps=eps)
    assert scores.accuracy == 1.0
    assert scores.mse == pytest.approx((eps / (1 + eps)) ** 2 / 3)
    # wrong test labels on 2 of 3 rows
    scores = sp.kernel_regression_scores(np.eye(4), labels, Ks, [0, 2, 0], eps=eps)
    assert scores.accuracy == pytest.approx(1 / 3)


def test_krr_sweep_matches_single_calls_and_marks_failures():
    K = np.diag([2.0, 1.0, 0.0, 1.0])  # singular: eps = 0 fails, tr K / n = 1
    Ks = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    y_test = np.array([0, 1])
    out = sp.kernel_regression_sweep(K, labels, Ks, y_test, [0.0, 0.1, 1.0])
    assert math.isnan(out.accuracy[0]) and math.isnan(out.mse[0])
    for i, eps in enumerate([0.1, 1.0], start=1):
        s = sp.kernel_regression_scores(K, labels, Ks, y_test, eps=eps)
        assert out.accuracy[i] == s.accuracy and out.mse[i] == pytest.approx(s.mse)
    np.testing.assert_array_equal(out.eps, [0.0, 0.1, 1.0])
    # closed form at eps = 1: K_reg = diag(3, 2, 1, 2); row 0 -> Y0/3, row 1 -> Y1/2 + Y2/1
    pred = np.array([[1 / 3, 0.0], [0.0, 1 / 2 + 1]])
    want_mse = np.mean((pred - _one_hot(y_test, 2)) ** 2)
    assert out.mse[2] == pytest.approx(want_mse)
    with pytest.raises(ValueError, match="eps_grid"):
        sp.kernel_regression_sweep(K, labels, Ks, y_test, [-1.0])


# ------------------------------------------------------------------- torch inputs
def test_torch_inputs_match_numpy():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(8, 5, generator=g, requires_grad=True)
    K_t = phi @ phi.T  # float32, requires grad
    K_n = K_t.detach().numpy().astype(np.float64)
    K2_t = (phi + 1.0) @ (phi + 1.0).T
    K2_n = K2_t.detach().numpy().astype(np.float64)
    labels_t = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    labels_n = labels_t.numpy()
    assert sp.kernel_distance(K_t, K2_t) == sp.kernel_distance(K_n, K2_n)
    assert sp.kernel_velocity(K_t, K2_t, 2) == sp.kernel_velocity(K_n, K2_n, 2)
    assert sp.kernel_target_alignment(K_t, labels_t, centered=True) == sp.kernel_target_alignment(
        K_n, labels_n, centered=True
    )
    w_t, U_t = sp.top_eigenpairs(K_t, 3)
    w_n, U_n = sp.top_eigenpairs(K_n, 3)
    assert isinstance(U_t, np.ndarray) and U_t.dtype == np.float64
    np.testing.assert_array_equal(w_t, w_n)
    np.testing.assert_array_equal(U_t, U_n)
    np.testing.assert_array_equal(
        sp.target_energy(torch.from_numpy(U_n), labels_t), sp.target_energy(U_n, labels_n)
    )
    Kreg_t = K_t + 0.1 * torch.eye(8)
    Kreg_n = Kreg_t.detach().numpy().astype(np.float64)
    pred_t = sp.kernel_regression(Kreg_t, labels_t, K_t, eps=1e-3)
    pred_n = sp.kernel_regression(Kreg_n, labels_n, K_n, eps=1e-3)
    np.testing.assert_array_equal(pred_t, pred_n)
    np.testing.assert_array_equal(sp.nngp_kernel(phi), sp.nngp_kernel(phi.detach().numpy().astype(np.float64)))
    assert sp.effective_rank(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(3.0)


def test_torch_bfloat16_and_wrong_types():
    K = torch.eye(3, dtype=torch.bfloat16)
    assert sp.kernel_frobenius_norm(K) == pytest.approx(math.sqrt(3))
    with pytest.raises(TypeError, match="NumPy array or a torch tensor"):
        sp.kernel_frobenius_norm("not a kernel")
    with pytest.raises(TypeError, match="complex"):
        sp.kernel_frobenius_norm(torch.eye(2, dtype=torch.complex64))


def test_kernel_angle_is_the_angle_between_kernels():
    from lightning_ntk.spectral import kernel_angle
    basis, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((6, 2)))
    a, b = np.outer(basis[:, 0], basis[:, 0]), np.outer(basis[:, 1], basis[:, 1])  # orthonormal in Frobenius
    for phi in (1e-7, 1e-4, 0.3, 1.2, np.pi / 2):  # a great circle: the angle is phi, tiny ones too
        k = np.cos(phi) * a + np.sin(phi) * b
        assert kernel_angle(a, 2.5 * k) == pytest.approx(phi, rel=1e-7)
    assert kernel_angle(a, -a) == pytest.approx(np.pi)
    k1, k2 = np.random.default_rng(4).standard_normal((2, 5, 5))
    cos = np.sum(k1 * k2) / np.linalg.norm(k1) / np.linalg.norm(k2)
    assert kernel_angle(k1, k2) == pytest.approx(np.arccos(cos), rel=1e-12)
