# STPM32/33/34 register map: rows, bit fields and status bits by their datasheet names
# (DS10272 register map, UM2066), declared once. The driver, the metering layer and the
# simulator (sim/stpm3x.py, sim/physics.py) read rows and bits from here; nobody copies
# a row number, an offset or a mask. Why one table and how it is checked:
# docs/decisions/0005-one-register-map.md (tests/test_driver_unit.py compares it with
# the datasheet's reset values and worked examples, written out independently).
#
# Names are public (the other layers import them), so each costs one entry in this
# module's globals; inside this file const() still folds them.
try:
    from micropython import const
except ImportError:  # CPython: host tests and the simulator's host process
    def const(x):
        return x

N_ROWS = const(70)             # rows 0..69; read address = row * 2
LAST_WRITABLE_ROW = const(20)  # rows 0..20; write address = row * 2 (+1 for bits 31:16)
NOP = const(0xFF)              # read address "no new address" / write address "no write"

# ---- rows ----
DSP_CR1 = const(0)      # channel 1 DSP configuration
DSP_CR2 = const(1)      # channel 2, same layout
DSP_CR3 = const(2)      # common: sag time, ZCR, tamper, reset / latch bits, 50/60 Hz
DSP_CR4 = const(3)      # phase compensation of both channels
DSP_CR5 = const(4)      # CHV1 gain, SWV_THR1, SAG_THR1
DSP_CR6 = const(5)      # CHC1 gain, SWC_THR1
DSP_CR7 = const(6)      # CHV2, SWV_THR2, SAG_THR2
DSP_CR8 = const(7)      # CHC2, SWC_THR2
DSP_CR9 = const(8)      # AH_UP1, OFA1, OFAF1 (power offsets, channel 1)
DSP_CR10 = const(9)     # AH_DOWN1, OFR1, OFS1
DSP_CR11 = const(10)    # channel 2, as DSP_CR9
DSP_CR12 = const(11)    # channel 2, as DSP_CR10
DFE_CR1 = const(12)     # channel 1 front end: enV, enC, current PGA gain
DFE_CR2 = const(13)
DSP_IRQ1 = const(14)    # interrupt masks, DSP_SR layout
DSP_IRQ2 = const(15)
DSP_SR1 = const(16)     # sticky status, cleared by writing 0
DSP_SR2 = const(17)
US_REG1 = const(18)     # serial: CRC polynomial / enable, bit order, UART timeout
US_REG2 = const(19)     # UART baud, frame delay
US_REG3 = const(20)     # serial status (upper half) and its masks (lower half)
DSP_EV1 = const(21)     # live events, every 128 us
DSP_EV2 = const(22)
DSP_REG1 = const(23)    # PH1 period [11:0], PH2 period [27:16]
DSP_REG2 = const(24)    # V1 sample; DSP_REG3 C1, DSP_REG4 V2, DSP_REG5 C2 (signed 24-bit)
DSP_REG6 = const(28)    # V1 fundamental; DSP_REG7 C1, DSP_REG8 V2, DSP_REG9 C2
DSP_REG14 = const(36)   # channel 1 RMS: V [14:0], I [31:15]
DSP_REG15 = const(37)   # channel 2 RMS
DSP_REG16 = const(38)   # SWV1_TIME [14:0], SAG1_TIME [30:16]
DSP_REG17 = const(39)   # SWC1_TIME [14:0], C1_PHA [27:16]
DSP_REG18 = const(40)   # channel 2, as DSP_REG16
DSP_REG19 = const(41)   # channel 2, as DSP_REG17
PH1_REG1 = const(42)    # PH1_REG1..12: energies, powers, AH
PH2_REG1 = const(54)    # PH2_REG1..12, same layout
TOT_REG1 = const(66)    # TOT_REG1..4: total active, fundamental, reactive, apparent energy
FIRST_DATA_ROW = const(21)   # rows 21..69 are computed live and copied out by a latch

# Per channel, the row of a quantity is its channel-1 row + channel x stride.
CH_STRIDE_CR = const(2)      # DSP_CR5/6 -> DSP_CR7/8, DSP_CR9/10 -> DSP_CR11/12
CH_STRIDE_REG = const(2)     # DSP_REG16/17 -> DSP_REG18/19
PH_STRIDE = const(12)        # PH1_REGx -> PH2_REGx
# PHx_REGn = PHx_REG1 + (n - 1): the register inside a channel's block
PH_ACTIVE_E = const(0)       # REG1: active energy (wide band)
PH_REACTIVE_E = const(2)     # REG3: reactive energy
PH_APPARENT_E = const(3)     # REG4: apparent energy
PH_ACTIVE_P = const(4)       # REG5: active power
PH_FUND_P = const(5)         # REG6: fundamental active power
PH_REACTIVE_P = const(6)     # REG7: reactive power
PH_APPARENT_P = const(7)     # REG8: apparent RMS power
PH_APPARENT_VP = const(8)    # REG9: apparent vectorial power
PH_MOM_ACTIVE_P = const(9)   # REG10: momentary active power
PH_MOM_FUND_P = const(10)    # REG11: momentary fundamental power
PH_AH_ACC = const(11)        # REG12: ampere-hour accumulator

# ---- reset values of rows 0..23 (DS10272 register map) ----
RESET_ROWS = (0x040000A0, 0x240000A0, 0x000004E0, 0x00000000,
              0x003FF800, 0x003FF800, 0x003FF800, 0x003FF800,
              0x00000FFF, 0x00000FFF, 0x00000FFF, 0x00000FFF,
              0x0F270327, 0x03270327, 0x00000000, 0x00000000,
              0x00000000, 0x00000000, 0x00004007, 0x00000683, 0x00000000,
              0x00000000, 0x00000000, 0x09C409C4)
DSP_CR1_RESET = const(0x040000A0)   # the first reply after a reset
PERIOD_RESET = const(2500)          # DSP_REG1 period fields after reset (50 Hz)

# ---- DSP_CR1 / DSP_CR2 ----
# [3:0] CLRSS_TO, 4 ClearSS, 5 ENVREF, [8:6] TC, 17 AEM, 18 APM, 19 BHPFV, 20 BHPFC,
# [27:24] LPW, [29:28] LPS, [31:30] LCS: left at their reset values (not named: every
# name here costs the meter RAM).
CR1_ROC = const(1 << 21)            # Rogowski integrator

# ---- DSP_CR3 ----
CR3_SAG_TIME_THR = const(0x00003FFF)   # [13:0], 8 us LSB
CR3_TMP_TOL_SHIFT = const(17)          # [18:17] tamper tolerance
CR3_TMP_TOL_MASK = const(3)
CR3_TMP_EN = const(1 << 19)
CR3_SW_RESET = const(1 << 20)          # software reset: configuration rows, data kept
CR3_LATCH1 = const(1 << 21)
CR3_LATCH2 = const(1 << 22)
CR3_AUTO_LATCH = const(1 << 23)        # latch every 128 us
CR3_REF_FREQ = const(1 << 27)          # 0 = 50 Hz, 1 = 60 Hz
CR3_SELF_CLEAR = const(0x00700000)     # SW reset, latch 1, latch 2 clear themselves
CR3_NOT_COMPARED = const(0x00F00000)   # ... and auto-latch: not compared on read-back

# ---- DSP_CR4: phase compensation ----
CR4_PHC2_SHIFT = const(0)     # [9:0]  current delay, 1/4 MHz steps
CR4_PHV2_SHIFT = const(10)    # [11:10] voltage delay, 512/4 MHz steps
CR4_PHC1_SHIFT = const(12)    # [21:12]
CR4_PHV1_SHIFT = const(22)    # [23:22]
PHC_MASK = const(0x3FF)
PHV_MASK = const(3)

# ---- DSP_CR5..8: gain calibration and thresholds ----
CHX_MASK = const(0xFFF)       # CHVx / CHCx [11:0], cal = 0.75 + CHx / 16384
CHX_MID = const(0x800)
SWV_THR_SHIFT = const(12)     # DSP_CR5/7 [21:12]
SAG_THR_SHIFT = const(22)     # DSP_CR5/7 [31:22]
SWC_THR_SHIFT = const(12)     # DSP_CR6/8 [21:12]
THR_MASK = const(0x3FF)

# ---- DSP_CR9..12: AH thresholds and power offsets ----
OFA_SHIFT = const(12)         # DSP_CR9/11  [21:12] active power offset
OFAF_SHIFT = const(22)        # DSP_CR9/11  [31:22] fundamental active power offset
OFR_SHIFT = const(12)         # DSP_CR10/12 [21:12] reactive power offset
OFS_SHIFT = const(22)         # DSP_CR10/12 [31:22] apparent power offset
# OFFSET_MASK (10 bits), offset_code(), offset_value(): drivers/stpm3x_offset.py, below
OFFSET_LSB_P = const(4)

# ---- DFE_CR1 / DFE_CR2 (the reserved 0x0327 pattern in both halves is kept by
# read-modify-write) ----
DFE_ENV = const(1 << 0)
DFE_ENC = const(1 << 16)
DFE_GAIN_SHIFT = const(26)    # [27:26] current PGA: 0 x2, 1 x4, 2 x8, 3 x16
DFE_GAIN_MASK = const(3)
DFE_GAINS = (2, 4, 8, 16)          # current PGA gain of each GAIN code

# ---- DSP_SR1/2 and DSP_IRQ1/2 (same layout) ----
SR_TOT_ACTIVE_SIGN = const(1 << 0)
SR_TOT_REACTIVE_SIGN = const(1 << 1)
SR_TOT_ACTIVE_OVF = const(1 << 2)
SR_TOT_REACTIVE_OVF = const(1 << 3)
SR_PH2_SIGN_SHIFT = const(4)       # 4..7: PH2 power sign A, F, R, S (1 = negative)
SR_PH2_OVF_SHIFT = const(8)        # 8..11: PH2 energy overflow A, F, R, S
SR_PH1_SIGN_SHIFT = const(12)      # 12..15
SR_PH1_OVF_SHIFT = const(16)       # 16..19
SR_C_STUCK = const(1 << 20)        # current sigma-delta stuck
SR_C_SWELL_START = const(1 << 22)
SR_C_SWELL_END = const(1 << 23)
SR_V_STUCK = const(1 << 24)        # voltage sigma-delta stuck
SR_PER_ERR = const(1 << 25)        # period out of 1536..3840
SR_SAG_START = const(1 << 26)
SR_SAG_END = const(1 << 27)
SR_SWELL_START = const(1 << 28)
SR_SWELL_END = const(1 << 29)
SR_TAMPER_HIGH = const(1 << 30)    # this channel's power is the higher one
SR_TAMPER = const(1 << 31)         # tamper or wrong connection

# ---- DSP_EV1/2 (live) ----
EV_TOT_SHIFT = const(0)            # 0..3 totals
EV_SIGN_SHIFT = const(4)           # 4..7 power sign
EV_OVF_SHIFT = const(8)            # 8..11 energy overflow
EV_C_ZCR = const(1 << 12)
EV_C_STUCK = const(1 << 13)
EV_C_SWELL_SHIFT = const(15)       # 15..18 current swell history
EV_V_ZCR = const(1 << 19)
EV_V_STUCK = const(1 << 20)
EV_PER_ERR = const(1 << 21)
EV_V_SWELL_SHIFT = const(22)       # 22..25
EV_SAG_SHIFT = const(26)           # 26..29

# ---- US_REG1 / US_REG2 ----
US1_CRC_POLY = const(0x000000FF)
US1_CRC_EN = const(1 << 14)
US1_LSB_FIRST = const(1 << 15)
US1_TIMEOUT_SHIFT = const(16)      # [23:16] UART RX timeout, ms
US1_TIMEOUT = const(0x00FF0000)
US2_BAUD = const(0x0000FFFF)

# ---- US_REG3: serial status (bits 31:16, sticky) and its masks (bits 15:0) ----
US3_UART_CRC = const(1 << 17)
US3_UART_TIMEOUT = const(1 << 18)
US3_UART_FRAME = const(1 << 19)
US3_RD_ADDR = const(1 << 26)       # read-address error
US3_WR_ADDR = const(1 << 27)       # write-address error
US3_SPI_CRC = const(1 << 28)
US3_SPI_TX_UNDER = const(1 << 29)
US3_SPI_RX_OVR = const(1 << 30)
US3_CRC_ERRORS = const(0x10020000)     # UART CRC | SPI CRC
US3_BUS_ERRORS = const(0x6C7D0000)     # break, timeout, frame, noise, overruns,
                                       # address errors, SPI under/overrun

# ---- data fields ----
RMS_V_MASK = const(0x7FFF)         # DSP_REG14/15 [14:0], 15 bits
RMS_I_SHIFT = const(15)            # DSP_REG14/15 [31:15], 17 bits
RMS_I_MASK = const(0x1FFFF)
PERIOD_MASK = const(0xFFF)         # DSP_REG1 [11:0] (PH1), [27:16] (PH2)
PERIOD_CH2_SHIFT = const(16)
PERIOD_MIN = const(1536)           # valid period range, 8 us LSB
PERIOD_MAX = const(3840)
PERIOD_HZ_NUM = const(125000)      # f = 125000 / period
PHA_SHIFT = const(16)              # DSP_REG17/19 [27:16]: C_PHA
PHA_MASK = const(0xFFF)
SWELL_TIME_MASK = const(0x7FFF)    # DSP_REG16..19 [14:0]
SAG_TIME_SHIFT = const(16)         # DSP_REG16/18 [30:16]
POWER_SIGN = const(1 << 28)
POWER_MASK = const(0x1FFFFFFF)
SAMPLE_SIGN = const(1 << 23)       # DSP_REG2..9 samples: signed 24-bit, sign-padded

# ---- conversions (reference "Conversions"; the formulas live in metering/scale.py) ----
VREF_V = 1.18                      # band-gap reference
AV = const(2)                      # voltage channel gain, fixed
DCLK_HZ = 7812.5                   # decimated sample rate; energy rows add P_reg / 2048
CAL_BASE = 0.75                    # cal = CAL_BASE + CHx / CAL_DIV (0.75..1.0)
CAL_DIV = const(16384)

# The power-offset code, where its unconfirmed sign encoding is decided: its own module,
# so that the driver holding its functions does not hold this map's globals (docs/ram.md)
from drivers.stpm3x_offset import OFFSET_MASK, offset_code, offset_value  # noqa: F401,E402


def ch_row(row_ch1, k, stride):
    """Row of channel index k (0 or 1) for a channel-1 row."""
    return row_ch1 + k * stride
