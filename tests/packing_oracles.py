"""The reference readers' dequantization of the GPTQ v1 and AWQ GEMM layouts, ported from AutoGPTQ
(qlinear_cuda_old's torch fallback) and AutoAWQ (packing_utils.dequantize_gemm): the oracles our packing and
our quantized runtime are checked against, written apart from kanana_quant's own unpackers."""

from __future__ import annotations

import numpy as np
import torch

AWQ_REVERSE_ORDER_REF = [0, 4, 1, 5, 2, 6, 3, 7]


def autogptq_dequant(qweight, qzeros, scales, bits, group_size):
    """AutoGPTQ qlinear_cuda_old forward's torch fallback: returns the fp16 weight [in, out]."""
    qweight = torch.from_numpy(np.asarray(qweight))
    qzeros = torch.from_numpy(np.asarray(qzeros))
    scales = torch.from_numpy(np.asarray(scales))
    in_f = qweight.shape[0] * 32 // bits
    group_size = in_f if group_size == -1 else group_size
    if bits in (2, 4, 8):
        wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
        small = torch.int16 if bits == 8 else torch.int8
        zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, 32 // bits),
                                          wf.unsqueeze(0)).to(small)
        torch.bitwise_and(zeros, (2 ** bits) - 1, out=zeros)
        zeros = zeros + 1
        zeros = zeros.reshape(-1, 1, zeros.shape[1] * zeros.shape[2])
        sc = scales.reshape(-1, 1, scales.shape[-1])
        weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, 32 // bits, -1),
                                           wf.unsqueeze(-1)).to(small)
        torch.bitwise_and(weight, (2 ** bits) - 1, out=weight)
        weight = weight.reshape(-1, group_size, weight.shape[2])
    else:
        wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
                           [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                           [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
        zeros = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
        zeros = zeros >> wf.unsqueeze(0)
        zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | ((zeros[:, :, 1, 0] << 2) & 0x4)
        zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | ((zeros[:, :, 2, 0] << 1) & 0x6)
        zeros = zeros & 0x7
        zeros = torch.cat([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], dim=2)
        zeros = zeros + 1
        zeros = zeros.reshape(-1, 1, zeros.shape[1] * zeros.shape[2])
        sc = scales.reshape(-1, 1, scales.shape[-1])
        weight = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
        weight = (weight >> wf.unsqueeze(-1)) & 0x7
        weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | ((weight[:, 1, 0] << 2) & 0x4)
        weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | ((weight[:, 2, 0] << 1) & 0x6)
        weight = weight & 0x7
        weight = torch.cat([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], dim=1)
        weight = weight.reshape(-1, group_size, weight.shape[2])
    weight = sc * (weight - zeros)
    return weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])


def autoawq_dequant(qweight, qzeros, scales, group_size):
    """AutoAWQ packing_utils.dequantize_gemm (unpack_awq + reverse_awq_order): fp16 weight [in, out]."""
    bits = 4
    qweight = torch.from_numpy(np.asarray(qweight))
    qzeros = torch.from_numpy(np.asarray(qzeros))
    scales = torch.from_numpy(np.asarray(scales))
    group_size = qweight.shape[0] if group_size == -1 else group_size
    shifts = torch.arange(0, 32, bits)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    order = torch.arange(izeros.shape[-1], dtype=torch.int32).view(-1, 32 // bits)
    order = order[:, AWQ_REVERSE_ORDER_REF].view(-1)
    izeros = izeros[:, order]
    iweights = iweights[:, order]
    iweights = torch.bitwise_and(iweights, (2 ** bits) - 1)
    izeros = torch.bitwise_and(izeros, (2 ** bits) - 1)
    scales = scales.repeat_interleave(group_size, dim=0)
    izeros = izeros.repeat_interleave(group_size, dim=0)
    return (iweights - izeros) * scales
