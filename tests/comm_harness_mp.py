# Sample records for scripts that run on micropython (mirrors comm_harness.SAMPLE_*).
INTERVAL = {
    "seq": 35040, "t_end": 1767225600, "dur_s": 900, "flags": 0, "tariff": 1,
    "ai_wh": 5123456, "ae_wh": 0, "rq_varh": [812345, 0, 0, 301234], "ap_vah": 5501234,
    "ai_ph_wh": [1712345, 1698765, 1712346], "ae_ph_wh": [0, 0, 0],
    "v_min_mv": [228100, 229050, 227480], "v_max_mv": [233900, 234400, 232990],
    "v_avg_mv": [230870, 231420, 230110], "pmax_w": 4210, "sags": [0, 0, 0],
    "swells": [0, 0, 0], "tariff_wh": [3123456, 2000000], "ph_invalid": 0,
}
