// src/backoff.ts
function backoffDelay(attempt, minDelay, maxDelay, random = Math.random) {
  const ceiling = attempt >= 64 ? maxDelay : Math.min(maxDelay, minDelay * 2 ** attempt);
  return random() * ceiling;
}
var RECONNECT_CODES = /* @__PURE__ */ new Set([1001, 1006, 1011, 1012, 1013]);
var CLOSE_POLICY = 1008;
var TOKEN_EXPIRED = 4001;

// src/emitter.ts
var Emitter = class {
  listeners = /* @__PURE__ */ new Map();
  /** Adds a listener; returns a function that removes it. */
  on(event, listener) {
    let set = this.listeners.get(event);
    if (set === void 0) {
      set = /* @__PURE__ */ new Set();
      this.listeners.set(event, set);
    }
    set.add(listener);
    return () => {
      this.off(event, listener);
    };
  }
  off(event, listener) {
    this.listeners.get(event)?.delete(listener);
  }
  /** True when a listener ran. A throwing listener is reported, never breaks the client. */
  emit(event, ...args) {
    const set = this.listeners.get(event);
    if (set === void 0 || set.size === 0) return false;
    for (const listener of [...set]) {
      try {
        listener(...args);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
    return true;
  }
};

// src/errors.ts
var KasagiError = class extends Error {
  name = "KasagiError";
};
var RelayError = class extends KasagiError {
  constructor(code, message, room) {
    super(`${code}: ${message}`);
    this.code = code;
    this.room = room;
  }
  code;
  room;
  name = "RelayError";
};
var ConnectionError = class extends KasagiError {
  constructor(message, closeCode, reason) {
    super(message);
    this.closeCode = closeCode;
    this.reason = reason;
  }
  closeCode;
  reason;
  name = "ConnectionError";
};
var ClientClosedError = class extends KasagiError {
  name = "ClientClosedError";
};

// node_modules/@msgpack/msgpack/dist.esm/utils/utf8.mjs
function utf8Count(str) {
  const strLength = str.length;
  let byteLength = 0;
  let pos = 0;
  while (pos < strLength) {
    let value = str.charCodeAt(pos++);
    if ((value & 4294967168) === 0) {
      byteLength++;
      continue;
    } else if ((value & 4294965248) === 0) {
      byteLength += 2;
    } else {
      if (value >= 55296 && value <= 56319) {
        if (pos < strLength) {
          const extra = str.charCodeAt(pos);
          if ((extra & 64512) === 56320) {
            ++pos;
            value = ((value & 1023) << 10) + (extra & 1023) + 65536;
          }
        }
      }
      if ((value & 4294901760) === 0) {
        byteLength += 3;
      } else {
        byteLength += 4;
      }
    }
  }
  return byteLength;
}
function utf8EncodeJs(str, output, outputOffset) {
  const strLength = str.length;
  let offset = outputOffset;
  let pos = 0;
  while (pos < strLength) {
    let value = str.charCodeAt(pos++);
    if ((value & 4294967168) === 0) {
      output[offset++] = value;
      continue;
    } else if ((value & 4294965248) === 0) {
      output[offset++] = value >> 6 & 31 | 192;
    } else {
      if (value >= 55296 && value <= 56319) {
        if (pos < strLength) {
          const extra = str.charCodeAt(pos);
          if ((extra & 64512) === 56320) {
            ++pos;
            value = ((value & 1023) << 10) + (extra & 1023) + 65536;
          }
        }
      }
      if ((value & 4294901760) === 0) {
        output[offset++] = value >> 12 & 15 | 224;
        output[offset++] = value >> 6 & 63 | 128;
      } else {
        output[offset++] = value >> 18 & 7 | 240;
        output[offset++] = value >> 12 & 63 | 128;
        output[offset++] = value >> 6 & 63 | 128;
      }
    }
    output[offset++] = value & 63 | 128;
  }
}
var sharedTextEncoder = new TextEncoder();
var TEXT_ENCODER_THRESHOLD = 50;
function utf8EncodeTE(str, output, outputOffset) {
  sharedTextEncoder.encodeInto(str, output.subarray(outputOffset));
}
function utf8Encode(str, output, outputOffset) {
  if (str.length > TEXT_ENCODER_THRESHOLD) {
    utf8EncodeTE(str, output, outputOffset);
  } else {
    utf8EncodeJs(str, output, outputOffset);
  }
}
var CHUNK_SIZE = 4096;
function utf8DecodeJs(bytes, inputOffset, byteLength) {
  let offset = inputOffset;
  const end = offset + byteLength;
  const units = [];
  let result = "";
  while (offset < end) {
    const byte1 = bytes[offset++];
    if ((byte1 & 128) === 0) {
      units.push(byte1);
    } else if ((byte1 & 224) === 192) {
      const byte2 = bytes[offset++] & 63;
      units.push((byte1 & 31) << 6 | byte2);
    } else if ((byte1 & 240) === 224) {
      const byte2 = bytes[offset++] & 63;
      const byte3 = bytes[offset++] & 63;
      units.push((byte1 & 31) << 12 | byte2 << 6 | byte3);
    } else if ((byte1 & 248) === 240) {
      const byte2 = bytes[offset++] & 63;
      const byte3 = bytes[offset++] & 63;
      const byte4 = bytes[offset++] & 63;
      let unit = (byte1 & 7) << 18 | byte2 << 12 | byte3 << 6 | byte4;
      if (unit > 65535) {
        unit -= 65536;
        units.push(unit >>> 10 & 1023 | 55296);
        unit = 56320 | unit & 1023;
      }
      units.push(unit);
    } else {
      units.push(byte1);
    }
    if (units.length >= CHUNK_SIZE) {
      result += String.fromCharCode(...units);
      units.length = 0;
    }
  }
  if (units.length > 0) {
    result += String.fromCharCode(...units);
  }
  return result;
}
var sharedTextDecoder = new TextDecoder();
var TEXT_DECODER_THRESHOLD = 200;
function utf8DecodeTD(bytes, inputOffset, byteLength) {
  const stringBytes = bytes.subarray(inputOffset, inputOffset + byteLength);
  return sharedTextDecoder.decode(stringBytes);
}
function utf8Decode(bytes, inputOffset, byteLength) {
  if (byteLength > TEXT_DECODER_THRESHOLD) {
    return utf8DecodeTD(bytes, inputOffset, byteLength);
  } else {
    return utf8DecodeJs(bytes, inputOffset, byteLength);
  }
}

// node_modules/@msgpack/msgpack/dist.esm/ExtData.mjs
var ExtData = class {
  type;
  data;
  constructor(type, data) {
    this.type = type;
    this.data = data;
  }
};

// node_modules/@msgpack/msgpack/dist.esm/DecodeError.mjs
var DecodeError = class _DecodeError extends Error {
  constructor(message) {
    super(message);
    const proto = Object.create(_DecodeError.prototype);
    Object.setPrototypeOf(this, proto);
    Object.defineProperty(this, "name", {
      configurable: true,
      enumerable: false,
      value: _DecodeError.name
    });
  }
};

// node_modules/@msgpack/msgpack/dist.esm/utils/int.mjs
var UINT32_MAX = 4294967295;
function setUint64(view, offset, value) {
  const high = value / 4294967296;
  const low = value;
  view.setUint32(offset, high);
  view.setUint32(offset + 4, low);
}
function setInt64(view, offset, value) {
  const high = Math.floor(value / 4294967296);
  const low = value;
  view.setUint32(offset, high);
  view.setUint32(offset + 4, low);
}
function getInt64(view, offset) {
  const high = view.getInt32(offset);
  const low = view.getUint32(offset + 4);
  return high * 4294967296 + low;
}
function getUint64(view, offset) {
  const high = view.getUint32(offset);
  const low = view.getUint32(offset + 4);
  return high * 4294967296 + low;
}

// node_modules/@msgpack/msgpack/dist.esm/timestamp.mjs
var EXT_TIMESTAMP = -1;
var TIMESTAMP32_MAX_SEC = 4294967296 - 1;
var TIMESTAMP64_MAX_SEC = 17179869184 - 1;
function encodeTimeSpecToTimestamp({ sec, nsec }) {
  if (sec >= 0 && nsec >= 0 && sec <= TIMESTAMP64_MAX_SEC) {
    if (nsec === 0 && sec <= TIMESTAMP32_MAX_SEC) {
      const rv = new Uint8Array(4);
      const view = new DataView(rv.buffer);
      view.setUint32(0, sec);
      return rv;
    } else {
      const secHigh = sec / 4294967296;
      const secLow = sec & 4294967295;
      const rv = new Uint8Array(8);
      const view = new DataView(rv.buffer);
      view.setUint32(0, nsec << 2 | secHigh & 3);
      view.setUint32(4, secLow);
      return rv;
    }
  } else {
    const rv = new Uint8Array(12);
    const view = new DataView(rv.buffer);
    view.setUint32(0, nsec);
    setInt64(view, 4, sec);
    return rv;
  }
}
function encodeDateToTimeSpec(date) {
  const msec = date.getTime();
  const sec = Math.floor(msec / 1e3);
  const nsec = (msec - sec * 1e3) * 1e6;
  const nsecInSec = Math.floor(nsec / 1e9);
  return {
    sec: sec + nsecInSec,
    nsec: nsec - nsecInSec * 1e9
  };
}
function encodeTimestampExtension(object) {
  if (object instanceof Date) {
    const timeSpec = encodeDateToTimeSpec(object);
    return encodeTimeSpecToTimestamp(timeSpec);
  } else {
    return null;
  }
}
function decodeTimestampToTimeSpec(data) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  switch (data.byteLength) {
    case 4: {
      const sec = view.getUint32(0);
      const nsec = 0;
      return { sec, nsec };
    }
    case 8: {
      const nsec30AndSecHigh2 = view.getUint32(0);
      const secLow32 = view.getUint32(4);
      const sec = (nsec30AndSecHigh2 & 3) * 4294967296 + secLow32;
      const nsec = nsec30AndSecHigh2 >>> 2;
      return { sec, nsec };
    }
    case 12: {
      const sec = getInt64(view, 4);
      const nsec = view.getUint32(0);
      return { sec, nsec };
    }
    default:
      throw new DecodeError(`Unrecognized data size for timestamp (expected 4, 8, or 12): ${data.length}`);
  }
}
function decodeTimestampExtension(data) {
  const timeSpec = decodeTimestampToTimeSpec(data);
  return new Date(timeSpec.sec * 1e3 + timeSpec.nsec / 1e6);
}
var timestampExtension = {
  type: EXT_TIMESTAMP,
  encode: encodeTimestampExtension,
  decode: decodeTimestampExtension
};

// node_modules/@msgpack/msgpack/dist.esm/ExtensionCodec.mjs
var ExtensionCodec = class _ExtensionCodec {
  static defaultCodec = new _ExtensionCodec();
  // ensures ExtensionCodecType<X> matches ExtensionCodec<X>
  // this will make type errors a lot more clear
  // eslint-disable-next-line @typescript-eslint/naming-convention
  __brand;
  // built-in extensions
  builtInEncoders = [];
  builtInDecoders = [];
  // custom extensions
  encoders = [];
  decoders = [];
  constructor() {
    this.register(timestampExtension);
  }
  register({ type, encode: encode2, decode: decode2 }) {
    if (type >= 0) {
      this.encoders[type] = encode2;
      this.decoders[type] = decode2;
    } else {
      const index = -1 - type;
      this.builtInEncoders[index] = encode2;
      this.builtInDecoders[index] = decode2;
    }
  }
  tryToEncode(object, context) {
    for (let i = 0; i < this.builtInEncoders.length; i++) {
      const encodeExt = this.builtInEncoders[i];
      if (encodeExt != null) {
        const data = encodeExt(object, context);
        if (data != null) {
          const type = -1 - i;
          return new ExtData(type, data);
        }
      }
    }
    for (let i = 0; i < this.encoders.length; i++) {
      const encodeExt = this.encoders[i];
      if (encodeExt != null) {
        const data = encodeExt(object, context);
        if (data != null) {
          const type = i;
          return new ExtData(type, data);
        }
      }
    }
    if (object instanceof ExtData) {
      return object;
    }
    return null;
  }
  decode(data, type, context) {
    const decodeExt = type < 0 ? this.builtInDecoders[-1 - type] : this.decoders[type];
    if (decodeExt) {
      return decodeExt(data, type, context);
    } else {
      return new ExtData(type, data);
    }
  }
};

// node_modules/@msgpack/msgpack/dist.esm/utils/typedArrays.mjs
function isArrayBufferLike(buffer) {
  return buffer instanceof ArrayBuffer || typeof SharedArrayBuffer !== "undefined" && buffer instanceof SharedArrayBuffer;
}
function ensureUint8Array(buffer) {
  if (buffer instanceof Uint8Array) {
    return buffer;
  } else if (ArrayBuffer.isView(buffer)) {
    return new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  } else if (isArrayBufferLike(buffer)) {
    return new Uint8Array(buffer);
  } else {
    return Uint8Array.from(buffer);
  }
}

// node_modules/@msgpack/msgpack/dist.esm/Encoder.mjs
var DEFAULT_MAX_DEPTH = 100;
var DEFAULT_INITIAL_BUFFER_SIZE = 2048;
var Encoder = class _Encoder {
  extensionCodec;
  context;
  useBigInt64;
  maxDepth;
  initialBufferSize;
  sortKeys;
  forceFloat32;
  ignoreUndefined;
  forceIntegerToFloat;
  pos;
  view;
  bytes;
  entered = false;
  constructor(options) {
    this.extensionCodec = options?.extensionCodec ?? ExtensionCodec.defaultCodec;
    this.context = options?.context;
    this.useBigInt64 = options?.useBigInt64 ?? false;
    this.maxDepth = options?.maxDepth ?? DEFAULT_MAX_DEPTH;
    this.initialBufferSize = options?.initialBufferSize ?? DEFAULT_INITIAL_BUFFER_SIZE;
    this.sortKeys = options?.sortKeys ?? false;
    this.forceFloat32 = options?.forceFloat32 ?? false;
    this.ignoreUndefined = options?.ignoreUndefined ?? false;
    this.forceIntegerToFloat = options?.forceIntegerToFloat ?? false;
    this.pos = 0;
    this.view = new DataView(new ArrayBuffer(this.initialBufferSize));
    this.bytes = new Uint8Array(this.view.buffer);
  }
  clone() {
    return new _Encoder({
      extensionCodec: this.extensionCodec,
      context: this.context,
      useBigInt64: this.useBigInt64,
      maxDepth: this.maxDepth,
      initialBufferSize: this.initialBufferSize,
      sortKeys: this.sortKeys,
      forceFloat32: this.forceFloat32,
      ignoreUndefined: this.ignoreUndefined,
      forceIntegerToFloat: this.forceIntegerToFloat
    });
  }
  reinitializeState() {
    this.pos = 0;
  }
  /**
   * This is almost equivalent to {@link Encoder#encode}, but it returns an reference of the encoder's internal buffer and thus much faster than {@link Encoder#encode}.
   *
   * @returns Encodes the object and returns a shared reference the encoder's internal buffer.
   */
  encodeSharedRef(object) {
    if (this.entered) {
      const instance = this.clone();
      return instance.encodeSharedRef(object);
    }
    try {
      this.entered = true;
      this.reinitializeState();
      this.doEncode(object, 1);
      return this.bytes.subarray(0, this.pos);
    } finally {
      this.entered = false;
    }
  }
  /**
   * @returns Encodes the object and returns a copy of the encoder's internal buffer.
   */
  encode(object) {
    if (this.entered) {
      const instance = this.clone();
      return instance.encode(object);
    }
    try {
      this.entered = true;
      this.reinitializeState();
      this.doEncode(object, 1);
      return this.bytes.slice(0, this.pos);
    } finally {
      this.entered = false;
    }
  }
  doEncode(object, depth2) {
    if (depth2 > this.maxDepth) {
      throw new Error(`Too deep objects in depth ${depth2}`);
    }
    if (object == null) {
      this.encodeNil();
    } else if (typeof object === "boolean") {
      this.encodeBoolean(object);
    } else if (typeof object === "number") {
      if (!this.forceIntegerToFloat) {
        this.encodeNumber(object);
      } else {
        this.encodeNumberAsFloat(object);
      }
    } else if (typeof object === "string") {
      this.encodeString(object);
    } else if (this.useBigInt64 && typeof object === "bigint") {
      this.encodeBigInt64(object);
    } else {
      this.encodeObject(object, depth2);
    }
  }
  ensureBufferSizeToWrite(sizeToWrite) {
    const requiredSize = this.pos + sizeToWrite;
    if (this.view.byteLength < requiredSize) {
      this.resizeBuffer(requiredSize * 2);
    }
  }
  resizeBuffer(newSize) {
    const newBuffer = new ArrayBuffer(newSize);
    const newBytes = new Uint8Array(newBuffer);
    const newView = new DataView(newBuffer);
    newBytes.set(this.bytes);
    this.view = newView;
    this.bytes = newBytes;
  }
  encodeNil() {
    this.writeU8(192);
  }
  encodeBoolean(object) {
    if (object === false) {
      this.writeU8(194);
    } else {
      this.writeU8(195);
    }
  }
  encodeNumber(object) {
    if (!this.forceIntegerToFloat && Number.isSafeInteger(object)) {
      if (object >= 0) {
        if (object < 128) {
          this.writeU8(object);
        } else if (object < 256) {
          this.writeU8(204);
          this.writeU8(object);
        } else if (object < 65536) {
          this.writeU8(205);
          this.writeU16(object);
        } else if (object < 4294967296) {
          this.writeU8(206);
          this.writeU32(object);
        } else if (!this.useBigInt64) {
          this.writeU8(207);
          this.writeU64(object);
        } else {
          this.encodeNumberAsFloat(object);
        }
      } else {
        if (object >= -32) {
          this.writeU8(224 | object + 32);
        } else if (object >= -128) {
          this.writeU8(208);
          this.writeI8(object);
        } else if (object >= -32768) {
          this.writeU8(209);
          this.writeI16(object);
        } else if (object >= -2147483648) {
          this.writeU8(210);
          this.writeI32(object);
        } else if (!this.useBigInt64) {
          this.writeU8(211);
          this.writeI64(object);
        } else {
          this.encodeNumberAsFloat(object);
        }
      }
    } else {
      this.encodeNumberAsFloat(object);
    }
  }
  encodeNumberAsFloat(object) {
    if (this.forceFloat32) {
      this.writeU8(202);
      this.writeF32(object);
    } else {
      this.writeU8(203);
      this.writeF64(object);
    }
  }
  encodeBigInt64(object) {
    if (object >= BigInt(0)) {
      this.writeU8(207);
      this.writeBigUint64(object);
    } else {
      this.writeU8(211);
      this.writeBigInt64(object);
    }
  }
  writeStringHeader(byteLength) {
    if (byteLength < 32) {
      this.writeU8(160 + byteLength);
    } else if (byteLength < 256) {
      this.writeU8(217);
      this.writeU8(byteLength);
    } else if (byteLength < 65536) {
      this.writeU8(218);
      this.writeU16(byteLength);
    } else if (byteLength < 4294967296) {
      this.writeU8(219);
      this.writeU32(byteLength);
    } else {
      throw new Error(`Too long string: ${byteLength} bytes in UTF-8`);
    }
  }
  encodeString(object) {
    const maxHeaderSize = 1 + 4;
    const byteLength = utf8Count(object);
    this.ensureBufferSizeToWrite(maxHeaderSize + byteLength);
    this.writeStringHeader(byteLength);
    utf8Encode(object, this.bytes, this.pos);
    this.pos += byteLength;
  }
  encodeObject(object, depth2) {
    const ext = this.extensionCodec.tryToEncode(object, this.context);
    if (ext != null) {
      this.encodeExtension(ext);
    } else if (Array.isArray(object)) {
      this.encodeArray(object, depth2);
    } else if (ArrayBuffer.isView(object)) {
      this.encodeBinary(object);
    } else if (typeof object === "object") {
      this.encodeMap(object, depth2);
    } else {
      throw new Error(`Unrecognized object: ${Object.prototype.toString.apply(object)}`);
    }
  }
  encodeBinary(object) {
    const size = object.byteLength;
    if (size < 256) {
      this.writeU8(196);
      this.writeU8(size);
    } else if (size < 65536) {
      this.writeU8(197);
      this.writeU16(size);
    } else if (size < 4294967296) {
      this.writeU8(198);
      this.writeU32(size);
    } else {
      throw new Error(`Too large binary: ${size}`);
    }
    const bytes = ensureUint8Array(object);
    this.writeU8a(bytes);
  }
  encodeArray(object, depth2) {
    const size = object.length;
    if (size < 16) {
      this.writeU8(144 + size);
    } else if (size < 65536) {
      this.writeU8(220);
      this.writeU16(size);
    } else if (size < 4294967296) {
      this.writeU8(221);
      this.writeU32(size);
    } else {
      throw new Error(`Too large array: ${size}`);
    }
    for (const item of object) {
      this.doEncode(item, depth2 + 1);
    }
  }
  countWithoutUndefined(object, keys) {
    let count = 0;
    for (const key of keys) {
      if (object[key] !== void 0) {
        count++;
      }
    }
    return count;
  }
  encodeMap(object, depth2) {
    const keys = Object.keys(object);
    if (this.sortKeys) {
      keys.sort();
    }
    const size = this.ignoreUndefined ? this.countWithoutUndefined(object, keys) : keys.length;
    if (size < 16) {
      this.writeU8(128 + size);
    } else if (size < 65536) {
      this.writeU8(222);
      this.writeU16(size);
    } else if (size < 4294967296) {
      this.writeU8(223);
      this.writeU32(size);
    } else {
      throw new Error(`Too large map object: ${size}`);
    }
    for (const key of keys) {
      const value = object[key];
      if (!(this.ignoreUndefined && value === void 0)) {
        this.encodeString(key);
        this.doEncode(value, depth2 + 1);
      }
    }
  }
  encodeExtension(ext) {
    if (typeof ext.data === "function") {
      const data = ext.data(this.pos + 6);
      const size2 = data.length;
      if (size2 >= 4294967296) {
        throw new Error(`Too large extension object: ${size2}`);
      }
      this.writeU8(201);
      this.writeU32(size2);
      this.writeI8(ext.type);
      this.writeU8a(data);
      return;
    }
    const size = ext.data.length;
    if (size === 1) {
      this.writeU8(212);
    } else if (size === 2) {
      this.writeU8(213);
    } else if (size === 4) {
      this.writeU8(214);
    } else if (size === 8) {
      this.writeU8(215);
    } else if (size === 16) {
      this.writeU8(216);
    } else if (size < 256) {
      this.writeU8(199);
      this.writeU8(size);
    } else if (size < 65536) {
      this.writeU8(200);
      this.writeU16(size);
    } else if (size < 4294967296) {
      this.writeU8(201);
      this.writeU32(size);
    } else {
      throw new Error(`Too large extension object: ${size}`);
    }
    this.writeI8(ext.type);
    this.writeU8a(ext.data);
  }
  writeU8(value) {
    this.ensureBufferSizeToWrite(1);
    this.view.setUint8(this.pos, value);
    this.pos++;
  }
  writeU8a(values) {
    const size = values.length;
    this.ensureBufferSizeToWrite(size);
    this.bytes.set(values, this.pos);
    this.pos += size;
  }
  writeI8(value) {
    this.ensureBufferSizeToWrite(1);
    this.view.setInt8(this.pos, value);
    this.pos++;
  }
  writeU16(value) {
    this.ensureBufferSizeToWrite(2);
    this.view.setUint16(this.pos, value);
    this.pos += 2;
  }
  writeI16(value) {
    this.ensureBufferSizeToWrite(2);
    this.view.setInt16(this.pos, value);
    this.pos += 2;
  }
  writeU32(value) {
    this.ensureBufferSizeToWrite(4);
    this.view.setUint32(this.pos, value);
    this.pos += 4;
  }
  writeI32(value) {
    this.ensureBufferSizeToWrite(4);
    this.view.setInt32(this.pos, value);
    this.pos += 4;
  }
  writeF32(value) {
    this.ensureBufferSizeToWrite(4);
    this.view.setFloat32(this.pos, value);
    this.pos += 4;
  }
  writeF64(value) {
    this.ensureBufferSizeToWrite(8);
    this.view.setFloat64(this.pos, value);
    this.pos += 8;
  }
  writeU64(value) {
    this.ensureBufferSizeToWrite(8);
    setUint64(this.view, this.pos, value);
    this.pos += 8;
  }
  writeI64(value) {
    this.ensureBufferSizeToWrite(8);
    setInt64(this.view, this.pos, value);
    this.pos += 8;
  }
  writeBigUint64(value) {
    this.ensureBufferSizeToWrite(8);
    this.view.setBigUint64(this.pos, value);
    this.pos += 8;
  }
  writeBigInt64(value) {
    this.ensureBufferSizeToWrite(8);
    this.view.setBigInt64(this.pos, value);
    this.pos += 8;
  }
};

// node_modules/@msgpack/msgpack/dist.esm/encode.mjs
function encode(value, options) {
  const encoder = new Encoder(options);
  return encoder.encodeSharedRef(value);
}

// node_modules/@msgpack/msgpack/dist.esm/utils/prettyByte.mjs
function prettyByte(byte) {
  return `${byte < 0 ? "-" : ""}0x${Math.abs(byte).toString(16).padStart(2, "0")}`;
}

// node_modules/@msgpack/msgpack/dist.esm/CachedKeyDecoder.mjs
var DEFAULT_MAX_KEY_LENGTH = 16;
var DEFAULT_MAX_LENGTH_PER_KEY = 16;
var CachedKeyDecoder = class {
  hit = 0;
  miss = 0;
  caches;
  maxKeyLength;
  maxLengthPerKey;
  constructor(maxKeyLength = DEFAULT_MAX_KEY_LENGTH, maxLengthPerKey = DEFAULT_MAX_LENGTH_PER_KEY) {
    this.maxKeyLength = maxKeyLength;
    this.maxLengthPerKey = maxLengthPerKey;
    this.caches = [];
    for (let i = 0; i < this.maxKeyLength; i++) {
      this.caches.push([]);
    }
  }
  canBeCached(byteLength) {
    return byteLength > 0 && byteLength <= this.maxKeyLength;
  }
  find(bytes, inputOffset, byteLength) {
    const records = this.caches[byteLength - 1];
    FIND_CHUNK: for (const record of records) {
      const recordBytes = record.bytes;
      for (let j = 0; j < byteLength; j++) {
        if (recordBytes[j] !== bytes[inputOffset + j]) {
          continue FIND_CHUNK;
        }
      }
      return record.str;
    }
    return null;
  }
  store(bytes, value) {
    const records = this.caches[bytes.length - 1];
    const record = { bytes, str: value };
    if (records.length >= this.maxLengthPerKey) {
      records[Math.random() * records.length | 0] = record;
    } else {
      records.push(record);
    }
  }
  decode(bytes, inputOffset, byteLength) {
    const cachedValue = this.find(bytes, inputOffset, byteLength);
    if (cachedValue != null) {
      this.hit++;
      return cachedValue;
    }
    this.miss++;
    const str = utf8DecodeJs(bytes, inputOffset, byteLength);
    const slicedCopyOfBytes = Uint8Array.prototype.slice.call(bytes, inputOffset, inputOffset + byteLength);
    this.store(slicedCopyOfBytes, str);
    return str;
  }
};

// node_modules/@msgpack/msgpack/dist.esm/Decoder.mjs
var STATE_ARRAY = "array";
var STATE_MAP_KEY = "map_key";
var STATE_MAP_VALUE = "map_value";
var mapKeyConverter = (key) => {
  if (typeof key === "string" || typeof key === "number") {
    return key;
  }
  throw new DecodeError("The type of key must be string or number but " + typeof key);
};
var StackPool = class {
  stack = [];
  stackHeadPosition = -1;
  get length() {
    return this.stackHeadPosition + 1;
  }
  top() {
    return this.stack[this.stackHeadPosition];
  }
  pushArrayState(size) {
    const state = this.getUninitializedStateFromPool();
    state.type = STATE_ARRAY;
    state.position = 0;
    state.size = size;
    state.array = new Array(size);
  }
  pushMapState(size) {
    const state = this.getUninitializedStateFromPool();
    state.type = STATE_MAP_KEY;
    state.readCount = 0;
    state.size = size;
    state.map = {};
  }
  getUninitializedStateFromPool() {
    this.stackHeadPosition++;
    if (this.stackHeadPosition === this.stack.length) {
      const partialState = {
        type: void 0,
        size: 0,
        array: void 0,
        position: 0,
        readCount: 0,
        map: void 0,
        key: null
      };
      this.stack.push(partialState);
    }
    return this.stack[this.stackHeadPosition];
  }
  release(state) {
    const topStackState = this.stack[this.stackHeadPosition];
    if (topStackState !== state) {
      throw new Error("Invalid stack state. Released state is not on top of the stack.");
    }
    if (state.type === STATE_ARRAY) {
      const partialState = state;
      partialState.size = 0;
      partialState.array = void 0;
      partialState.position = 0;
      partialState.type = void 0;
    }
    if (state.type === STATE_MAP_KEY || state.type === STATE_MAP_VALUE) {
      const partialState = state;
      partialState.size = 0;
      partialState.map = void 0;
      partialState.readCount = 0;
      partialState.type = void 0;
    }
    this.stackHeadPosition--;
  }
  reset() {
    this.stack.length = 0;
    this.stackHeadPosition = -1;
  }
};
var HEAD_BYTE_REQUIRED = -1;
var EMPTY_VIEW = new DataView(new ArrayBuffer(0));
var EMPTY_BYTES = new Uint8Array(EMPTY_VIEW.buffer);
try {
  EMPTY_VIEW.getInt8(0);
} catch (e) {
  if (!(e instanceof RangeError)) {
    throw new Error("This module is not supported in the current JavaScript engine because DataView does not throw RangeError on out-of-bounds access");
  }
}
var MORE_DATA = new RangeError("Insufficient data");
var sharedCachedKeyDecoder = new CachedKeyDecoder();
var Decoder = class _Decoder {
  extensionCodec;
  context;
  useBigInt64;
  rawStrings;
  maxStrLength;
  maxBinLength;
  maxArrayLength;
  maxMapLength;
  maxExtLength;
  keyDecoder;
  mapKeyConverter;
  totalPos = 0;
  pos = 0;
  view = EMPTY_VIEW;
  bytes = EMPTY_BYTES;
  headByte = HEAD_BYTE_REQUIRED;
  stack = new StackPool();
  entered = false;
  constructor(options) {
    this.extensionCodec = options?.extensionCodec ?? ExtensionCodec.defaultCodec;
    this.context = options?.context;
    this.useBigInt64 = options?.useBigInt64 ?? false;
    this.rawStrings = options?.rawStrings ?? false;
    this.maxStrLength = options?.maxStrLength ?? UINT32_MAX;
    this.maxBinLength = options?.maxBinLength ?? UINT32_MAX;
    this.maxArrayLength = options?.maxArrayLength ?? UINT32_MAX;
    this.maxMapLength = options?.maxMapLength ?? UINT32_MAX;
    this.maxExtLength = options?.maxExtLength ?? UINT32_MAX;
    this.keyDecoder = options?.keyDecoder !== void 0 ? options.keyDecoder : sharedCachedKeyDecoder;
    this.mapKeyConverter = options?.mapKeyConverter ?? mapKeyConverter;
  }
  clone() {
    return new _Decoder({
      extensionCodec: this.extensionCodec,
      context: this.context,
      useBigInt64: this.useBigInt64,
      rawStrings: this.rawStrings,
      maxStrLength: this.maxStrLength,
      maxBinLength: this.maxBinLength,
      maxArrayLength: this.maxArrayLength,
      maxMapLength: this.maxMapLength,
      maxExtLength: this.maxExtLength,
      keyDecoder: this.keyDecoder
    });
  }
  reinitializeState() {
    this.totalPos = 0;
    this.headByte = HEAD_BYTE_REQUIRED;
    this.stack.reset();
  }
  setBuffer(buffer) {
    const bytes = ensureUint8Array(buffer);
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }
  appendBuffer(buffer) {
    if (this.headByte === HEAD_BYTE_REQUIRED && !this.hasRemaining(1)) {
      this.setBuffer(buffer);
    } else {
      const remainingData = this.bytes.subarray(this.pos);
      const newData = ensureUint8Array(buffer);
      const newBuffer = new Uint8Array(remainingData.length + newData.length);
      newBuffer.set(remainingData);
      newBuffer.set(newData, remainingData.length);
      this.setBuffer(newBuffer);
    }
  }
  hasRemaining(size) {
    return this.view.byteLength - this.pos >= size;
  }
  createExtraByteError(posToShow) {
    const { view, pos } = this;
    return new RangeError(`Extra ${view.byteLength - pos} of ${view.byteLength} byte(s) found at buffer[${posToShow}]`);
  }
  /**
   * @throws {@link DecodeError}
   * @throws {@link RangeError}
   */
  decode(buffer) {
    if (this.entered) {
      const instance = this.clone();
      return instance.decode(buffer);
    }
    try {
      this.entered = true;
      this.reinitializeState();
      this.setBuffer(buffer);
      const object = this.doDecodeSync();
      if (this.hasRemaining(1)) {
        throw this.createExtraByteError(this.pos);
      }
      return object;
    } finally {
      this.entered = false;
    }
  }
  *decodeMulti(buffer) {
    if (this.entered) {
      const instance = this.clone();
      yield* instance.decodeMulti(buffer);
      return;
    }
    try {
      this.entered = true;
      this.reinitializeState();
      this.setBuffer(buffer);
      while (this.hasRemaining(1)) {
        yield this.doDecodeSync();
      }
    } finally {
      this.entered = false;
    }
  }
  async decodeAsync(stream) {
    if (this.entered) {
      const instance = this.clone();
      return instance.decodeAsync(stream);
    }
    try {
      this.entered = true;
      let decoded = false;
      let object;
      for await (const buffer of stream) {
        if (decoded) {
          this.entered = false;
          throw this.createExtraByteError(this.totalPos);
        }
        this.appendBuffer(buffer);
        try {
          object = this.doDecodeSync();
          decoded = true;
        } catch (e) {
          if (!(e instanceof RangeError)) {
            throw e;
          }
        }
        this.totalPos += this.pos;
      }
      if (decoded) {
        if (this.hasRemaining(1)) {
          throw this.createExtraByteError(this.totalPos);
        }
        return object;
      }
      const { headByte, pos, totalPos } = this;
      throw new RangeError(`Insufficient data in parsing ${prettyByte(headByte)} at ${totalPos} (${pos} in the current buffer)`);
    } finally {
      this.entered = false;
    }
  }
  decodeArrayStream(stream) {
    return this.decodeMultiAsync(stream, true);
  }
  decodeStream(stream) {
    return this.decodeMultiAsync(stream, false);
  }
  async *decodeMultiAsync(stream, isArray) {
    if (this.entered) {
      const instance = this.clone();
      yield* instance.decodeMultiAsync(stream, isArray);
      return;
    }
    try {
      this.entered = true;
      let isArrayHeaderRequired = isArray;
      let arrayItemsLeft = -1;
      for await (const buffer of stream) {
        if (isArray && arrayItemsLeft === 0) {
          throw this.createExtraByteError(this.totalPos);
        }
        this.appendBuffer(buffer);
        if (isArrayHeaderRequired) {
          arrayItemsLeft = this.readArraySize();
          isArrayHeaderRequired = false;
          this.complete();
        }
        try {
          while (true) {
            yield this.doDecodeSync();
            if (--arrayItemsLeft === 0) {
              break;
            }
          }
        } catch (e) {
          if (!(e instanceof RangeError)) {
            throw e;
          }
        }
        this.totalPos += this.pos;
      }
    } finally {
      this.entered = false;
    }
  }
  doDecodeSync() {
    DECODE: while (true) {
      const headByte = this.readHeadByte();
      let object;
      if (headByte >= 224) {
        object = headByte - 256;
      } else if (headByte < 192) {
        if (headByte < 128) {
          object = headByte;
        } else if (headByte < 144) {
          const size = headByte - 128;
          if (size !== 0) {
            this.pushMapState(size);
            this.complete();
            continue DECODE;
          } else {
            object = {};
          }
        } else if (headByte < 160) {
          const size = headByte - 144;
          if (size !== 0) {
            this.pushArrayState(size);
            this.complete();
            continue DECODE;
          } else {
            object = [];
          }
        } else {
          const byteLength = headByte - 160;
          object = this.decodeString(byteLength, 0);
        }
      } else if (headByte === 192) {
        object = null;
      } else if (headByte === 194) {
        object = false;
      } else if (headByte === 195) {
        object = true;
      } else if (headByte === 202) {
        object = this.readF32();
      } else if (headByte === 203) {
        object = this.readF64();
      } else if (headByte === 204) {
        object = this.readU8();
      } else if (headByte === 205) {
        object = this.readU16();
      } else if (headByte === 206) {
        object = this.readU32();
      } else if (headByte === 207) {
        if (this.useBigInt64) {
          object = this.readU64AsBigInt();
        } else {
          object = this.readU64();
        }
      } else if (headByte === 208) {
        object = this.readI8();
      } else if (headByte === 209) {
        object = this.readI16();
      } else if (headByte === 210) {
        object = this.readI32();
      } else if (headByte === 211) {
        if (this.useBigInt64) {
          object = this.readI64AsBigInt();
        } else {
          object = this.readI64();
        }
      } else if (headByte === 217) {
        const byteLength = this.lookU8();
        object = this.decodeString(byteLength, 1);
      } else if (headByte === 218) {
        const byteLength = this.lookU16();
        object = this.decodeString(byteLength, 2);
      } else if (headByte === 219) {
        const byteLength = this.lookU32();
        object = this.decodeString(byteLength, 4);
      } else if (headByte === 220) {
        const size = this.readU16();
        if (size !== 0) {
          this.pushArrayState(size);
          this.complete();
          continue DECODE;
        } else {
          object = [];
        }
      } else if (headByte === 221) {
        const size = this.readU32();
        if (size !== 0) {
          this.pushArrayState(size);
          this.complete();
          continue DECODE;
        } else {
          object = [];
        }
      } else if (headByte === 222) {
        const size = this.readU16();
        if (size !== 0) {
          this.pushMapState(size);
          this.complete();
          continue DECODE;
        } else {
          object = {};
        }
      } else if (headByte === 223) {
        const size = this.readU32();
        if (size !== 0) {
          this.pushMapState(size);
          this.complete();
          continue DECODE;
        } else {
          object = {};
        }
      } else if (headByte === 196) {
        const size = this.lookU8();
        object = this.decodeBinary(size, 1);
      } else if (headByte === 197) {
        const size = this.lookU16();
        object = this.decodeBinary(size, 2);
      } else if (headByte === 198) {
        const size = this.lookU32();
        object = this.decodeBinary(size, 4);
      } else if (headByte === 212) {
        object = this.decodeExtension(1, 0);
      } else if (headByte === 213) {
        object = this.decodeExtension(2, 0);
      } else if (headByte === 214) {
        object = this.decodeExtension(4, 0);
      } else if (headByte === 215) {
        object = this.decodeExtension(8, 0);
      } else if (headByte === 216) {
        object = this.decodeExtension(16, 0);
      } else if (headByte === 199) {
        const size = this.lookU8();
        object = this.decodeExtension(size, 1);
      } else if (headByte === 200) {
        const size = this.lookU16();
        object = this.decodeExtension(size, 2);
      } else if (headByte === 201) {
        const size = this.lookU32();
        object = this.decodeExtension(size, 4);
      } else {
        throw new DecodeError(`Unrecognized type byte: ${prettyByte(headByte)}`);
      }
      this.complete();
      const stack = this.stack;
      while (stack.length > 0) {
        const state = stack.top();
        if (state.type === STATE_ARRAY) {
          state.array[state.position] = object;
          state.position++;
          if (state.position === state.size) {
            object = state.array;
            stack.release(state);
          } else {
            continue DECODE;
          }
        } else if (state.type === STATE_MAP_KEY) {
          if (object === "__proto__") {
            throw new DecodeError("The key __proto__ is not allowed");
          }
          state.key = this.mapKeyConverter(object);
          state.type = STATE_MAP_VALUE;
          continue DECODE;
        } else {
          state.map[state.key] = object;
          state.readCount++;
          if (state.readCount === state.size) {
            object = state.map;
            stack.release(state);
          } else {
            state.key = null;
            state.type = STATE_MAP_KEY;
            continue DECODE;
          }
        }
      }
      return object;
    }
  }
  readHeadByte() {
    if (this.headByte === HEAD_BYTE_REQUIRED) {
      this.headByte = this.readU8();
    }
    return this.headByte;
  }
  complete() {
    this.headByte = HEAD_BYTE_REQUIRED;
  }
  readArraySize() {
    const headByte = this.readHeadByte();
    switch (headByte) {
      case 220:
        return this.readU16();
      case 221:
        return this.readU32();
      default: {
        if (headByte < 160) {
          return headByte - 144;
        } else {
          throw new DecodeError(`Unrecognized array type byte: ${prettyByte(headByte)}`);
        }
      }
    }
  }
  pushMapState(size) {
    if (size > this.maxMapLength) {
      throw new DecodeError(`Max length exceeded: map length (${size}) > maxMapLengthLength (${this.maxMapLength})`);
    }
    this.stack.pushMapState(size);
  }
  pushArrayState(size) {
    if (size > this.maxArrayLength) {
      throw new DecodeError(`Max length exceeded: array length (${size}) > maxArrayLength (${this.maxArrayLength})`);
    }
    this.stack.pushArrayState(size);
  }
  decodeString(byteLength, headerOffset) {
    if (!this.rawStrings || this.stateIsMapKey()) {
      return this.decodeUtf8String(byteLength, headerOffset);
    }
    return this.decodeBinary(byteLength, headerOffset);
  }
  /**
   * @throws {@link RangeError}
   */
  decodeUtf8String(byteLength, headerOffset) {
    if (byteLength > this.maxStrLength) {
      throw new DecodeError(`Max length exceeded: UTF-8 byte length (${byteLength}) > maxStrLength (${this.maxStrLength})`);
    }
    if (this.bytes.byteLength < this.pos + headerOffset + byteLength) {
      throw MORE_DATA;
    }
    const offset = this.pos + headerOffset;
    let object;
    if (this.stateIsMapKey() && this.keyDecoder?.canBeCached(byteLength)) {
      object = this.keyDecoder.decode(this.bytes, offset, byteLength);
    } else {
      object = utf8Decode(this.bytes, offset, byteLength);
    }
    this.pos += headerOffset + byteLength;
    return object;
  }
  stateIsMapKey() {
    if (this.stack.length > 0) {
      const state = this.stack.top();
      return state.type === STATE_MAP_KEY;
    }
    return false;
  }
  /**
   * @throws {@link RangeError}
   */
  decodeBinary(byteLength, headOffset) {
    if (byteLength > this.maxBinLength) {
      throw new DecodeError(`Max length exceeded: bin length (${byteLength}) > maxBinLength (${this.maxBinLength})`);
    }
    if (!this.hasRemaining(byteLength + headOffset)) {
      throw MORE_DATA;
    }
    const offset = this.pos + headOffset;
    const object = this.bytes.subarray(offset, offset + byteLength);
    this.pos += headOffset + byteLength;
    return object;
  }
  decodeExtension(size, headOffset) {
    if (size > this.maxExtLength) {
      throw new DecodeError(`Max length exceeded: ext length (${size}) > maxExtLength (${this.maxExtLength})`);
    }
    const extType = this.view.getInt8(this.pos + headOffset);
    const data = this.decodeBinary(
      size,
      headOffset + 1
      /* extType */
    );
    return this.extensionCodec.decode(data, extType, this.context);
  }
  lookU8() {
    return this.view.getUint8(this.pos);
  }
  lookU16() {
    return this.view.getUint16(this.pos);
  }
  lookU32() {
    return this.view.getUint32(this.pos);
  }
  readU8() {
    const value = this.view.getUint8(this.pos);
    this.pos++;
    return value;
  }
  readI8() {
    const value = this.view.getInt8(this.pos);
    this.pos++;
    return value;
  }
  readU16() {
    const value = this.view.getUint16(this.pos);
    this.pos += 2;
    return value;
  }
  readI16() {
    const value = this.view.getInt16(this.pos);
    this.pos += 2;
    return value;
  }
  readU32() {
    const value = this.view.getUint32(this.pos);
    this.pos += 4;
    return value;
  }
  readI32() {
    const value = this.view.getInt32(this.pos);
    this.pos += 4;
    return value;
  }
  readU64() {
    const value = getUint64(this.view, this.pos);
    this.pos += 8;
    return value;
  }
  readI64() {
    const value = getInt64(this.view, this.pos);
    this.pos += 8;
    return value;
  }
  readU64AsBigInt() {
    const value = this.view.getBigUint64(this.pos);
    this.pos += 8;
    return value;
  }
  readI64AsBigInt() {
    const value = this.view.getBigInt64(this.pos);
    this.pos += 8;
    return value;
  }
  readF32() {
    const value = this.view.getFloat32(this.pos);
    this.pos += 4;
    return value;
  }
  readF64() {
    const value = this.view.getFloat64(this.pos);
    this.pos += 8;
    return value;
  }
};

// node_modules/@msgpack/msgpack/dist.esm/decode.mjs
function decode(buffer, options) {
  const decoder = new Decoder(options);
  return decoder.decode(buffer);
}

// src/patch.ts
var MAX_DEPTH = 128;
var PatchError = class extends Error {
  name = "PatchError";
};
var hasOwn = (obj, key) => Object.prototype.hasOwnProperty.call(obj, key);
function isObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
function setMember(obj, key, value) {
  if (key === "__proto__") {
    Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
  } else {
    obj[key] = value;
  }
}
function member(obj, key) {
  return hasOwn(obj, key) ? obj[key] : void 0;
}
function parsePointer(pointer) {
  if (pointer === "") return [];
  if (!pointer.startsWith("/")) throw new PatchError(`bad pointer ${JSON.stringify(pointer)}`);
  return pointer.slice(1).split("/").map((token) => {
    if (/~(?![01])/.test(token)) throw new PatchError(`bad pointer ${JSON.stringify(pointer)}`);
    return token.replace(/~1/g, "/").replace(/~0/g, "~");
  });
}
var INDEX = /^(0|[1-9][0-9]*)$/;
function arrayIndex(arr, token, forInsert) {
  if (forInsert && token === "-") return arr.length;
  if (!INDEX.test(token)) throw new PatchError(`bad array index ${JSON.stringify(token)}`);
  const index = Number(token);
  if (index > arr.length || !forInsert && index === arr.length) {
    throw new PatchError(`array index ${token} out of range`);
  }
  return index;
}
function jsonEqual(a, b) {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a)) {
    if (!Array.isArray(b) || a.length !== b.length) return false;
    return a.every((item, i) => jsonEqual(item, b[i]));
  }
  if (Array.isArray(b)) return false;
  const keys = Object.keys(a);
  if (keys.length !== Object.keys(b).length) return false;
  return keys.every((key) => hasOwn(b, key) && jsonEqual(a[key], b[key]));
}
function depth(value, limit) {
  if (typeof value !== "object" || value === null) return 0;
  if (limit <= 0) return 1;
  let deepest = 0;
  for (const child of Array.isArray(value) ? value : Object.values(value)) {
    deepest = Math.max(deepest, depth(child, limit - 1));
    if (deepest >= limit) break;
  }
  return 1 + deepest;
}
function get(doc, tokens, pointer) {
  let node = doc;
  for (const token of tokens) {
    if (Array.isArray(node)) {
      node = node[arrayIndex(node, token, false)];
    } else if (isObject(node) && hasOwn(node, token)) {
      node = node[token];
    } else {
      throw new PatchError(`path ${pointer} not found`);
    }
  }
  return node;
}
var Writer = class {
  fresh = /* @__PURE__ */ new WeakSet();
  writable(node) {
    if (this.fresh.has(node)) return node;
    const copy = Array.isArray(node) ? node.slice() : { ...node };
    this.fresh.add(copy);
    return copy;
  }
  /** After a copy one value is reachable twice: nothing made so far may change in place. */
  forget() {
    this.fresh = /* @__PURE__ */ new WeakSet();
  }
  /** The document with `change` applied to the (copied) parent of the last token. */
  update(node, tokens, i, pointer, change) {
    const token = tokens[i];
    if (typeof node !== "object" || node === null) throw new PatchError(`path ${pointer} not found`);
    if (i === tokens.length - 1) {
      const parent2 = this.writable(node);
      change(parent2, token);
      return parent2;
    }
    if (Array.isArray(node)) {
      const index = arrayIndex(node, token, false);
      const child2 = this.update(node[index], tokens, i + 1, pointer, change);
      if (child2 === node[index]) return node;
      const parent2 = this.writable(node);
      parent2[index] = child2;
      return parent2;
    }
    if (!hasOwn(node, token)) throw new PatchError(`path ${pointer} not found`);
    const old = node[token];
    const child = this.update(old, tokens, i + 1, pointer, change);
    if (child === old) return node;
    const parent = this.writable(node);
    setMember(parent, token, child);
    return parent;
  }
};
function checkDepth(tokens, value, pointer) {
  if (tokens.length + depth(value, MAX_DEPTH - tokens.length) > MAX_DEPTH) {
    throw new PatchError(`${pointer}: the state would nest deeper than ${MAX_DEPTH} levels`);
  }
}
function add(w, doc, tokens, value, pointer) {
  checkDepth(tokens, value, pointer);
  if (tokens.length === 0) return value;
  return w.update(doc, tokens, 0, pointer, (parent, token) => {
    if (Array.isArray(parent)) parent.splice(arrayIndex(parent, token, true), 0, value);
    else setMember(parent, token, value);
  });
}
function replace(w, doc, tokens, value, pointer) {
  checkDepth(tokens, value, pointer);
  if (tokens.length === 0) return value;
  return w.update(doc, tokens, 0, pointer, (parent, token) => {
    if (Array.isArray(parent)) {
      parent[arrayIndex(parent, token, false)] = value;
    } else {
      if (!hasOwn(parent, token)) throw new PatchError(`path ${pointer} not found`);
      setMember(parent, token, value);
    }
  });
}
function remove(w, doc, tokens, pointer) {
  if (tokens.length === 0) throw new PatchError("cannot remove the root");
  return w.update(doc, tokens, 0, pointer, (parent, token) => {
    if (Array.isArray(parent)) {
      parent.splice(arrayIndex(parent, token, false), 1);
    } else {
      if (!hasOwn(parent, token)) throw new PatchError(`path ${pointer} not found`);
      delete parent[token];
    }
  });
}
function field(op, name, index) {
  if (!hasOwn(op, name)) throw new PatchError(`op ${index}: missing ${name}`);
  return op[name];
}
function pointerField(op, name, index) {
  const value = field(op, name, index);
  if (typeof value !== "string") throw new PatchError(`op ${index}: ${name} must be a string`);
  return value;
}
function applyPatch(doc, patch) {
  if (!Array.isArray(patch)) throw new PatchError("a patch must be an array of operations");
  const w = new Writer();
  let result = doc;
  patch.forEach((raw, index) => {
    if (!isObject(raw)) throw new PatchError(`op ${index} is not an object`);
    const op = raw;
    const name = op["op"];
    const path = pointerField(op, "path", index);
    const tokens = parsePointer(path);
    switch (name) {
      case "add":
        result = add(w, result, tokens, field(op, "value", index), path);
        break;
      case "replace":
        result = replace(w, result, tokens, field(op, "value", index), path);
        break;
      case "remove":
        result = remove(w, result, tokens, path);
        break;
      case "test":
        if (!jsonEqual(get(result, tokens, path), field(op, "value", index))) {
          throw new PatchError(`op ${index} (test ${path}): the value differs`);
        }
        break;
      case "copy": {
        const from = pointerField(op, "from", index);
        const value = get(result, parsePointer(from), from);
        result = add(w, result, tokens, value, path);
        w.forget();
        break;
      }
      case "move": {
        const from = pointerField(op, "from", index);
        const fromTokens = parsePointer(from);
        const value = get(result, fromTokens, from);
        if (from === path) break;
        if (fromTokens.length === 0 || path.startsWith(from) && path[from.length] === "/") {
          throw new PatchError(`op ${index}: cannot move ${from} into itself`);
        }
        result = add(w, remove(w, result, fromTokens, from), tokens, value, path);
        break;
      }
      default:
        throw new PatchError(`op ${index}: unknown op ${JSON.stringify(name)}`);
    }
  });
  return result;
}
function applyMerge(doc, merge) {
  return mergeInto(doc, merge, 0);
}
function mergeInto(target, patch, level) {
  if (!isObject(patch)) {
    if (level + depth(patch, MAX_DEPTH - level) > MAX_DEPTH) {
      throw new PatchError(`the state would nest deeper than ${MAX_DEPTH} levels`);
    }
    return patch;
  }
  if (level >= MAX_DEPTH) throw new PatchError(`the state would nest deeper than ${MAX_DEPTH} levels`);
  const base = isObject(target) ? target : {};
  const result = { ...base };
  for (const key of Object.keys(patch)) {
    const value = patch[key];
    if (value === null) {
      delete result[key];
    } else {
      setMember(result, key, mergeInto(member(base, key), value, level + 1));
    }
  }
  return result;
}
function applyDelta(doc, delta) {
  return "patch" in delta ? applyPatch(doc, delta.patch) : applyMerge(doc, delta.merge);
}

// src/protocol.ts
var SUBPROTOCOLS = {
  json: "kasagi.v1.json",
  msgpack: "kasagi.v1.msgpack"
};
var ROOM_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
var MAX_KEY_CHARS = 64;
var ProtocolError = class extends Error {
  name = "ProtocolError";
};
function encodeMessage(format, message) {
  return format === "msgpack" ? encode(message) : JSON.stringify(message);
}
function checkRoom(room) {
  if (typeof room !== "string" || !ROOM_NAME.test(room)) {
    throw new TypeError(`not a valid room name: ${JSON.stringify(room)}`);
  }
}
function joinMessage(room, since, id, presence) {
  const message = { t: "join", room, id };
  if (since !== null) message["since"] = since;
  if (presence === true) message["presence"] = true;
  return message;
}
function checkDelta(delta) {
  if (!isObject(delta)) throw new TypeError("a delta is { patch: [...] } or { merge: {...} }");
  const hasPatch = Object.prototype.hasOwnProperty.call(delta, "patch");
  const hasMerge = Object.prototype.hasOwnProperty.call(delta, "merge");
  if (hasPatch === hasMerge) throw new TypeError("a delta has exactly one of patch or merge");
  if (hasPatch && !Array.isArray(delta["patch"])) {
    throw new TypeError("patch must be an array of RFC 6902 operations");
  }
  if (hasMerge && delta["merge"] === void 0) throw new TypeError("merge must be a JSON value");
}
function deltaMessage(room, delta, key, id) {
  const body = "patch" in delta ? { patch: delta.patch } : { merge: delta.merge };
  return { t: "delta", room, ...body, key, id };
}
function decodeFrame(data) {
  let value;
  try {
    if (typeof data === "string") value = JSON.parse(data);
    else if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) value = decode(data);
    else throw new ProtocolError("a frame must be text or binary");
  } catch (error) {
    if (error instanceof ProtocolError) throw error;
    throw new ProtocolError(`undecodable message: ${String(error)}`);
  }
  if (!isObject(value)) throw new ProtocolError("a message must be an object");
  return value;
}
function seqField(obj, name) {
  const value = obj[name];
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0) {
    throw new ProtocolError(`${String(obj["t"])}: ${name} must be a non-negative integer`);
  }
  return value;
}
function roomField(obj) {
  const room = obj["room"];
  if (typeof room !== "string") throw new ProtocolError(`${String(obj["t"])}: room missing`);
  return room;
}
function idField(obj) {
  const id = obj["id"];
  return typeof id === "number" || typeof id === "string" ? id : void 0;
}
function memberField(value) {
  if (!isObject(value) || typeof value["conn"] !== "string") {
    throw new ProtocolError("presence: a member needs a conn");
  }
  const sub = value["sub"];
  return { conn: value["conn"], sub: typeof sub === "string" ? sub : null, info: value["info"] ?? {} };
}
function optionalString(value) {
  return typeof value === "string" ? value : void 0;
}
function parse(data) {
  const obj = decodeFrame(data);
  const t = obj["t"];
  const has = (name) => Object.prototype.hasOwnProperty.call(obj, name);
  switch (t) {
    case "delta": {
      const from = seqField(obj, "from");
      const seq = seqField(obj, "seq");
      if (from === 0 || from > seq) throw new ProtocolError(`delta: from ${from} with seq ${seq}`);
      if (has("patch") === has("merge")) throw new ProtocolError("delta: exactly one of patch or merge");
      const delta = has("patch") ? { patch: obj["patch"] } : { merge: obj["merge"] };
      return { t, room: roomField(obj), from, seq, delta };
    }
    case "joined": {
      if (obj["resumed"] !== true && !has("state")) throw new ProtocolError("joined: neither state nor resumed");
      const state = obj["resumed"] === true ? void 0 : obj["state"];
      return { t, room: roomField(obj), seq: seqField(obj, "seq"), state, id: idField(obj) };
    }
    case "ack":
      return { t, room: roomField(obj), seq: seqField(obj, "seq"), id: idField(obj) };
    case "error": {
      const code = obj["code"];
      if (typeof code !== "string") throw new ProtocolError("error: code missing");
      return {
        t,
        code,
        message: optionalString(obj["message"]) ?? "",
        id: idField(obj),
        room: optionalString(obj["room"])
      };
    }
    case "reset":
      if (!has("state")) throw new ProtocolError("reset: state missing");
      return { t, room: roomField(obj), seq: seqField(obj, "seq"), state: obj["state"] };
    case "left":
      return { t, room: roomField(obj), id: idField(obj), code: optionalString(obj["code"]) };
    case "presence": {
      const members = obj["members"];
      if (!Array.isArray(members)) throw new ProtocolError("presence: members must be an array");
      return { t, room: roomField(obj), members: members.map(memberField), id: idField(obj) };
    }
    case "presence_join":
    case "presence_leave":
      return { t, room: roomField(obj), member: memberField(obj["member"]) };
    case "authed": {
      const exp = obj["exp"];
      return {
        t,
        sub: optionalString(obj["sub"]) ?? null,
        exp: typeof exp === "number" && Number.isFinite(exp) ? exp : void 0,
        id: idField(obj)
      };
    }
    default:
      if (typeof t !== "string") throw new ProtocolError("a message needs a type t");
      return { t: "other", type: t, message: obj };
  }
}
var RoomStream = class {
  state = {};
  seq = null;
  waiting = true;
  // A resume went wrong: only a full join can put the state right.
  full = false;
  /** True between a `joined` and a gap or a lost connection. */
  get synced() {
    return !this.waiting;
  }
  /** What the next `join` carries: the last seq held, if any. */
  since() {
    return this.full ? null : this.seq;
  }
  /** A `join` went out, or the connection was lost: ignore frames until `joined`. */
  rejoinSent() {
    this.waiting = true;
  }
  onJoined(seq, state) {
    if (state === void 0) {
      if (this.seq === null || this.full || seq !== this.seq) {
        this.full = true;
        this.waiting = true;
        return { kind: "rejoin", since: null, reason: `resumed at ${seq}, held ${String(this.seq)}` };
      }
      this.waiting = false;
      return { kind: "ignored" };
    }
    this.state = state;
    this.seq = seq;
    this.waiting = false;
    this.full = false;
    return { kind: "replaced", seq, reset: false };
  }
  onReset(seq, state) {
    this.state = state;
    this.seq = seq;
    return { kind: "replaced", seq, reset: true };
  }
  onDelta(from, seq, delta) {
    if (this.waiting || this.seq === null) return { kind: "ignored" };
    if (from !== this.seq + 1) {
      this.waiting = true;
      return { kind: "rejoin", since: this.seq, reason: `frame from ${from} after seq ${this.seq}` };
    }
    let next;
    try {
      next = applyDelta(this.state, "patch" in delta ? { patch: delta.patch.filter((op) => op.op !== "test") } : delta);
    } catch (error) {
      if (!(error instanceof PatchError)) throw error;
      this.full = true;
      this.waiting = true;
      return { kind: "rejoin", since: null, reason: `frame ${from}..${seq} does not apply: ${error.message}` };
    }
    this.state = next;
    this.seq = seq;
    return { kind: "applied", from, seq, delta };
  }
};

// src/socket.ts
var OPEN = 1;
function inNode() {
  const proc = globalThis.process;
  return typeof proc?.versions?.node === "string";
}
async function socketFactory(given) {
  if (given === void 0 && inNode()) {
    const { WebSocket } = await import("ws");
    return {
      headers: true,
      open: (url, protocol, options) => new WebSocket(url, [protocol], {
        headers: options.headers,
        maxPayload: options.maxPayload,
        // The relay writes one pre-built frame to every member: no compression.
        perMessageDeflate: false
      })
    };
  }
  const ctor = given ?? globalThis.WebSocket;
  if (ctor === void 0) throw new Error("no WebSocket implementation: pass the WebSocket option");
  return { headers: false, open: (url, protocol) => new ctor(url, [protocol]) };
}

// src/client.ts
var DEFAULTS = {
  minDelay: 250,
  maxDelay: 1e4,
  format: "json",
  maxAttempts: Infinity,
  unavailableRetries: 8,
  maxMessageBytes: 64 * 1024 * 1024
};
function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}
function resolveUrl(url) {
  const base = globalThis.location?.href;
  const parsed = new URL(url, typeof base === "string" ? base : void 0);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  else if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new TypeError(`not a ws:, wss:, http: or https: URL: ${url}`);
  }
  return parsed.href;
}
function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
var Room = class extends Emitter {
  /** @internal use `client.room(name)` */
  constructor(client, name, options) {
    super();
    this.client = client;
    this.name = name;
    this.options = options;
  }
  client;
  name;
  options;
  /** The members (with the `presence` option), as the relay's presence reports them. */
  members = [];
  /** @internal */
  stream = new RoomStream();
  /** @internal the pending `join()`, until a `joined` or an error. */
  ready = null;
  /** @internal joins answered `unavailable` in a row. */
  unavailable = 0;
  /** The room's JSON document. Read-only: each change makes a new one, sharing what stayed. */
  get state() {
    return this.stream.state;
  }
  /** The seq of `state`: the last delta of the room applied here (0 before the first join). */
  get seq() {
    return this.stream.seq ?? 0;
  }
  /** Joins the room; resolves once its state is here. After a reconnect it resumes by itself. */
  join() {
    return this.client.joinRoom(this);
  }
  /**
   * Sends a delta, `{ patch: [...] }` (RFC 6902) or `{ merge: {...} }` (RFC 7396); resolves
   * with the seq the relay gave it once acknowledged. A key is added: after a reconnect or
   * an `unavailable` the delta goes again with the same key, so it ends with exactly one
   * seq. Rejects with RelayError for a refusal (bad_patch, too_large, rate_limited, ...).
   * Joining is not needed to send.
   */
  send(delta, options = {}) {
    return this.client.sendDelta(this.name, delta, options);
  }
  /** Asks the relay who is in the room now (any relay of the deployment); needs no join. */
  presence() {
    return this.client.requestPresence(this);
  }
  /** Leaves the room; its state stays readable, and a later `join()` resumes from it. */
  leave() {
    return this.client.leaveRoom(this);
  }
  /** @internal */
  fire(event, ...args) {
    this.emit(event, ...args);
  }
};
var AUTH = /* @__PURE__ */ Symbol("auth");
var REFRESH_MARGIN_MS = 3e4;
var Client = class extends Emitter {
  url;
  format;
  /** Close codes of every connection lost and reconnected (1006 for a lost connection). */
  disconnects = [];
  /** Every time a room's stream had a gap (or a bad resume) and was joined again, and why. */
  gaps = [];
  /** Deltas sent again: after a reconnect, and after an `unavailable`. */
  resent = 0;
  options;
  handles = /* @__PURE__ */ new Map();
  /** Rooms joined or being joined: joined again after every reconnect. */
  rooms = /* @__PURE__ */ new Map();
  unacked = /* @__PURE__ */ new Map();
  requests = /* @__PURE__ */ new Map();
  /** Requests sent on this connection, oldest first: the relay answers them in order. */
  sentOrder = [];
  timers = /* @__PURE__ */ new Set();
  ws = null;
  live = false;
  opening = false;
  reconnectTimer = null;
  attempt = 0;
  nextId = 1;
  closed = false;
  authTimer = null;
  statusValue = "disconnected";
  waiters = [];
  constructor(url, options = {}) {
    super();
    this.url = resolveUrl(url);
    this.options = { ...DEFAULTS, ...options };
    this.format = this.options.format;
    if (!(this.format in SUBPROTOCOLS)) throw new TypeError(`format must be "json" or "msgpack"`);
  }
  get status() {
    return this.statusValue;
  }
  /** The room `name` (the same object for the same name); `join()` it to follow it. */
  room(name, options = {}) {
    checkRoom(name);
    let room = this.handles.get(name);
    if (room === void 0) {
      room = new Room(this, name, options);
      this.handles.set(name, room);
    }
    return room;
  }
  /** Resolves once connected (it connects if it is not); rejects if it cannot. */
  connect() {
    if (this.closed) return Promise.reject(new ClientClosedError("client is closed"));
    if (this.live) return Promise.resolve(void 0);
    const waiter = deferred();
    this.waiters.push(waiter);
    this.ensureConnecting();
    return waiter.promise;
  }
  /** Closes the connection for good; pending joins and sends reject with ClientClosedError. */
  close() {
    if (this.closed) return;
    this.closed = true;
    const error = new ClientClosedError("client closed");
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    const ws = this.ws;
    this.dropConnection();
    ws?.close(1e3, "client closed");
    this.rejectAll(error, true);
    this.setStatus("disconnected");
  }
  // ------------------------------------------------------------------------ requests
  /** @internal */
  joinRoom(room) {
    if (this.closed) return Promise.reject(new ClientClosedError("client is closed"));
    if (this.rooms.get(room.name) === room) {
      this.ensureConnecting();
      return room.ready?.promise ?? Promise.resolve(room);
    }
    room.ready = deferred();
    this.rooms.set(room.name, room);
    if (this.live) this.sendJoin(room);
    else this.ensureConnecting();
    return room.ready.promise;
  }
  /** @internal */
  async leaveRoom(room) {
    if (this.rooms.get(room.name) !== room) return;
    this.rooms.delete(room.name);
    room.ready?.reject(new ClientClosedError(`left ${room.name}`));
    room.ready = null;
    room.stream.rejoinSent();
    if (!this.live) return;
    const id = this.nextId++;
    await new Promise((done) => {
      this.requests.set(id, { kind: "leave", room, done });
      this.write({ t: "leave", room: room.name, id }, id);
    });
  }
  /** @internal */
  async requestPresence(room) {
    if (this.closed) throw new ClientClosedError("client is closed");
    await this.connect();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.requests.set(id, {
        kind: "presence",
        room,
        done: (result) => {
          if (result instanceof Error) reject(result);
          else resolve(result);
        }
      });
      this.write({ t: "presence", room: room.name, id }, id);
    });
  }
  /** The members of a room joined with `presence`, read again after every (re)join. */
  followPresence(room) {
    const id = this.nextId++;
    this.requests.set(id, {
      kind: "presence",
      room,
      // A relay without presence answers bad_message: the room just has no members list.
      done: () => void 0
    });
    this.write({ t: "presence", room: room.name, id }, id);
  }
  /** Sends the `auth` message again with a fresh token before the current one expires. */
  scheduleRefresh(exp) {
    if (this.authTimer !== null) {
      clearTimeout(this.authTimer);
      this.timers.delete(this.authTimer);
    }
    this.authTimer = null;
    const getToken = this.options.getToken;
    const ws = this.ws;
    if (getToken === void 0 || ws === null) return;
    const left = exp * 1e3 - Date.now();
    const wait = Math.max(1e3, left - Math.min(REFRESH_MARGIN_MS, left / 2));
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      this.authTimer = null;
      void (async () => {
        let token;
        try {
          token = await getToken();
        } catch (error) {
          this.emit("error", new KasagiError(`getToken failed: ${String(error)}`));
          return;
        }
        if (ws !== this.ws || !this.live || ws.readyState !== OPEN) return;
        this.sentOrder.push(AUTH);
        ws.send(encodeMessage(this.format, { t: "auth", token }));
      })();
    }, wait);
    this.authTimer = timer;
    this.timers.add(timer);
  }
  /** @internal */
  async sendDelta(roomName, delta, options) {
    if (this.closed) throw new ClientClosedError("client is closed");
    checkRoom(roomName);
    checkDelta(delta);
    const key = options.key ?? randomKey();
    if (typeof key !== "string" || key.length < 1 || key.length > MAX_KEY_CHARS) {
      throw new TypeError(`key must be 1-${MAX_KEY_CHARS} characters`);
    }
    if (this.unacked.has(key)) throw new TypeError(`a delta with key ${key} is already waiting for its ack`);
    const data = encodeMessage(this.format, deltaMessage(roomName, delta, key, key));
    const result = deferred();
    const out = {
      room: roomName,
      key,
      data,
      resolve: result.resolve,
      reject: result.reject,
      unavailable: 0,
      sent: false
    };
    this.unacked.set(key, out);
    if (this.live) this.transmit(out);
    else this.ensureConnecting();
    return result.promise;
  }
  transmit(out) {
    if (out.sent) this.resent++;
    out.sent = true;
    this.writeRaw(out.data, out.key);
  }
  sendJoin(room) {
    const id = this.nextId++;
    room.stream.rejoinSent();
    this.requests.set(id, { kind: "join", room });
    this.write(joinMessage(room.name, room.stream.since(), id, room.options.presence), id);
  }
  write(message, id) {
    if (this.live) this.writeRaw(encodeMessage(this.format, message), id);
  }
  writeRaw(data, id) {
    const ws = this.ws;
    if (ws === null || !this.live || ws.readyState !== OPEN) return;
    this.sentOrder.push(id);
    ws.send(data);
  }
  // ------------------------------------------------------------------ the connection
  setStatus(status) {
    if (status === this.statusValue) return;
    this.statusValue = status;
    this.emit("status", status);
  }
  ensureConnecting() {
    if (this.closed || this.ws !== null || this.opening || this.reconnectTimer !== null) return;
    this.scheduleOpen(0);
  }
  scheduleOpen(delay) {
    this.setStatus("connecting");
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      void this.open();
    }, delay);
  }
  async open() {
    this.opening = true;
    let ws;
    let factory;
    let token;
    try {
      factory = await socketFactory(this.options.WebSocket);
    } catch (error) {
      this.opening = false;
      this.fail(new ConnectionError(`no WebSocket implementation: ${String(error)}`));
      return;
    }
    try {
      token = this.options.getToken === void 0 ? void 0 : await this.options.getToken();
    } catch (error) {
      this.opening = false;
      this.afterClose(1006, `getToken failed: ${String(error)}`);
      return;
    }
    this.opening = false;
    if (this.closed) return;
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const protocol = SUBPROTOCOLS[this.format];
    try {
      ws = factory.open(this.url, protocol, { headers, maxPayload: this.options.maxMessageBytes });
    } catch (error) {
      this.fail(new ConnectionError(`cannot connect to ${this.url}: ${String(error)}`));
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      if (ws.protocol !== protocol && this.format === "msgpack") {
        this.dropConnection();
        ws.close(1e3);
        this.fail(new ConnectionError(`the relay did not accept ${protocol}`));
        return;
      }
      this.live = true;
      if (token && !factory.headers) {
        this.sentOrder.push(AUTH);
        ws.send(encodeMessage(this.format, { t: "auth", token }));
      }
      this.resume();
      this.setStatus("connected");
      for (const waiter of this.waiters.splice(0)) waiter.resolve(void 0);
    };
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      this.attempt = 0;
      let reply;
      try {
        reply = parse(event.data);
      } catch (error) {
        if (!(error instanceof ProtocolError)) throw error;
        this.emit("error", new KasagiError(`ignoring a malformed message from the relay: ${error.message}`));
        return;
      }
      this.dispatch(reply);
    };
    ws.onerror = () => {
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.dropConnection();
      this.afterClose(event.code, event.reason);
    };
  }
  /** Forget the current connection: its requests will never be answered. */
  dropConnection() {
    if (this.ws !== null) {
      this.ws.onopen = this.ws.onmessage = this.ws.onclose = null;
    }
    this.ws = null;
    this.live = false;
    this.sentOrder = [];
    for (const pending of this.requests.values()) {
      if (pending.kind === "leave") pending.done();
      else if (pending.kind === "presence") pending.done(new ConnectionError("connection lost"));
    }
    if (this.authTimer !== null) {
      clearTimeout(this.authTimer);
      this.timers.delete(this.authTimer);
    }
    this.authTimer = null;
    this.requests.clear();
    for (const room of this.rooms.values()) room.stream.rejoinSent();
  }
  afterClose(code, reason) {
    if (this.closed) return;
    if (code === CLOSE_POLICY && this.rooms.size === 0 && this.unacked.size === 0) {
      this.setStatus("disconnected");
      return;
    }
    const retry = RECONNECT_CODES.has(code) || code === TOKEN_EXPIRED && this.options.getToken !== void 0;
    if (!retry) {
      this.fail(new ConnectionError(`the relay closed the connection: ${code} ${reason}`.trim(), code, reason));
      return;
    }
    if (this.attempt >= this.options.maxAttempts) {
      this.fail(new ConnectionError(`gave up after ${this.attempt} attempts (last close ${code})`, code, reason));
      return;
    }
    this.disconnects.push(code);
    const delay = backoffDelay(this.attempt, this.options.minDelay, this.options.maxDelay);
    this.attempt++;
    this.scheduleOpen(delay);
  }
  resume() {
    for (const room of this.rooms.values()) this.sendJoin(room);
    for (const out of this.unacked.values()) this.transmit(out);
  }
  /** Not retried: everything waiting fails; joined rooms are joined again by the next request. */
  fail(error) {
    this.setStatus("disconnected");
    this.rejectAll(error, false);
    this.emit("error", error);
  }
  rejectAll(error, forget) {
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
    for (const out of this.unacked.values()) out.reject(error);
    this.unacked.clear();
    for (const room of [...this.rooms.values()]) {
      const ready = room.ready;
      if (ready !== null) {
        room.ready = null;
        ready.reject(error);
        this.rooms.delete(room.name);
      } else if (forget) {
        this.rooms.delete(room.name);
      }
      if (!(error instanceof ClientClosedError)) room.fire("error", error);
    }
  }
  // ------------------------------------------------------------------------ replies
  /** The request an answer belongs to; an `error` without `id` answers the oldest one. */
  answered(id) {
    if (id === void 0) {
      const oldest = this.sentOrder.shift();
      return oldest === AUTH ? void 0 : oldest;
    }
    const index = this.sentOrder.indexOf(id);
    if (index >= 0) this.sentOrder.splice(0, index + 1);
    return id;
  }
  dispatch(reply) {
    switch (reply.t) {
      case "delta": {
        const room = this.rooms.get(reply.room);
        if (room === void 0) return;
        const step = room.stream.onDelta(reply.from, reply.seq, reply.delta);
        if (step.kind === "applied") {
          room.fire("change", room.state, { from: step.from, seq: step.seq, delta: step.delta });
        } else if (step.kind === "rejoin") {
          this.gaps.push(`${room.name}: ${step.reason}`);
          this.sendJoin(room);
        }
        return;
      }
      case "ack": {
        const id = this.answered(reply.id);
        const out = id === void 0 ? void 0 : this.unacked.get(String(id));
        if (out === void 0) return;
        this.unacked.delete(out.key);
        out.resolve({ seq: reply.seq });
        return;
      }
      case "joined": {
        const id = this.answered(reply.id);
        if (id !== void 0) this.requests.delete(id);
        const room = this.rooms.get(reply.room);
        if (room === void 0) return;
        const step = room.stream.onJoined(reply.seq, reply.state);
        if (step.kind === "rejoin") {
          this.gaps.push(`${room.name}: ${step.reason}`);
          this.sendJoin(room);
          return;
        }
        room.unavailable = 0;
        if (room.options.presence === true) this.followPresence(room);
        const ready = room.ready;
        if (ready !== null) {
          room.ready = null;
          ready.resolve(room);
        } else if (step.kind === "replaced") {
          room.fire("reset", room.state, { seq: reply.seq });
        }
        return;
      }
      case "reset": {
        const room = this.rooms.get(reply.room);
        if (room === void 0) return;
        room.stream.onReset(reply.seq, reply.state);
        room.fire("reset", room.state, { seq: reply.seq });
        return;
      }
      case "presence": {
        const id = this.answered(reply.id);
        const pending = id === void 0 ? void 0 : this.requests.get(id);
        if (pending?.kind === "presence") {
          this.requests.delete(id);
          pending.done(reply.members);
        }
        const room = this.handles.get(reply.room);
        if (room?.options.presence !== true) return;
        room.members = reply.members;
        room.fire("presence", room.members);
        return;
      }
      case "presence_join":
      case "presence_leave": {
        const room = this.rooms.get(reply.room);
        if (room?.options.presence !== true) return;
        const others = room.members.filter((m) => m.conn !== reply.member.conn);
        room.members = reply.t === "presence_join" ? [...others, reply.member] : others;
        room.fire("presence", room.members);
        return;
      }
      case "authed":
        this.answered(reply.id);
        if (reply.exp !== void 0) this.scheduleRefresh(reply.exp);
        return;
      case "left": {
        const id = this.answered(reply.id);
        const pending = id === void 0 ? void 0 : this.requests.get(id);
        if (pending?.kind === "leave") {
          this.requests.delete(id);
          pending.done();
        } else if (reply.code !== void 0) {
          const room = this.rooms.get(reply.room);
          if (room !== void 0) {
            this.rooms.delete(room.name);
            room.fire("error", new RelayError(reply.code, "left by the relay", room.name));
          }
        }
        return;
      }
      case "error":
        this.onError(reply);
        return;
      case "other":
        return;
    }
  }
  onError(reply) {
    const id = this.answered(reply.id);
    const error = new RelayError(reply.code, reply.message, reply.room);
    const out = id === void 0 ? void 0 : this.unacked.get(String(id));
    if (out !== void 0) {
      if (reply.code === "unavailable" && out.unavailable < this.options.unavailableRetries) {
        out.unavailable++;
        this.later(out.unavailable - 1, () => {
          if (this.unacked.get(out.key) === out) this.transmit(out);
        });
        return;
      }
      this.unacked.delete(out.key);
      out.reject(error);
      return;
    }
    const pending = id === void 0 ? void 0 : this.requests.get(id);
    if (pending?.kind === "presence") {
      this.requests.delete(id);
      pending.done(error);
      return;
    }
    if (pending?.kind === "join") {
      this.requests.delete(id);
      const room = pending.room;
      if (reply.code === "unavailable" && room.unavailable < this.options.unavailableRetries) {
        room.unavailable++;
        this.later(room.unavailable - 1, () => {
          if (this.rooms.get(room.name) === room) this.sendJoin(room);
        });
        return;
      }
      if (this.rooms.get(room.name) === room) this.rooms.delete(room.name);
      const ready = room.ready;
      room.ready = null;
      ready?.reject(error);
      room.fire("error", error);
      return;
    }
    this.emit("error", error);
  }
  /** Runs `fn` after a backoff delay, if the client is still connected then. */
  later(attempt, fn) {
    const timer = setTimeout(
      () => {
        this.timers.delete(timer);
        if (this.live) fn();
      },
      backoffDelay(attempt, this.options.minDelay, this.options.maxDelay)
    );
    this.timers.add(timer);
  }
};
export {
  Client,
  ClientClosedError,
  ConnectionError,
  KasagiError,
  MAX_DEPTH,
  PatchError,
  ProtocolError,
  RECONNECT_CODES,
  RelayError,
  Room,
  RoomStream,
  SUBPROTOCOLS,
  applyDelta,
  applyMerge,
  applyPatch,
  backoffDelay,
  jsonEqual,
  parse
};
