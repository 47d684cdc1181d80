// pacsnode's viewer harness: a SEG opened by @cornerstonejs/adapters as OHIF opens it
// (createFromDICOMSegBuffer over the source series' image ids), in the browser. Bundled
// by build.mjs once per cornerstone version; run by run.mjs in headless chromium.
import { metaData } from '@cornerstonejs/core';
import { adaptersSEG } from '@cornerstonejs/adapters';
import dcmjs from 'dcmjs';

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function naturalize(buffer) {
  const dicom = DicomMessage.readFile(buffer);
  return DicomMetaDictionary.naturalizeDataset(dicom.dict);
}

function numbers(value) {
  return (Array.isArray(value) ? value : [value]).map(Number);
}

function modules(ds) {
  const iop = numbers(ds.ImageOrientationPatient);
  const spacing = numbers(ds.PixelSpacing);
  return {
    instance: ds,
    generalImageModule: { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: Number(ds.InstanceNumber) },
    generalSeriesModule: {
      seriesInstanceUID: ds.SeriesInstanceUID, studyInstanceUID: ds.StudyInstanceUID,
      modality: ds.Modality,
    },
    imagePlaneModule: {
      rows: ds.Rows, columns: ds.Columns, frameOfReferenceUID: ds.FrameOfReferenceUID,
      imageOrientationPatient: iop, rowCosines: iop.slice(0, 3), columnCosines: iop.slice(3, 6),
      imagePositionPatient: numbers(ds.ImagePositionPatient), pixelSpacing: spacing,
      rowPixelSpacing: spacing[0], columnPixelSpacing: spacing[1],
      sliceThickness: Number(ds.SliceThickness || 1),
    },
    imagePixelModule: {
      rows: ds.Rows, columns: ds.Columns, bitsAllocated: ds.BitsAllocated,
      bitsStored: ds.BitsStored, highBit: ds.HighBit, samplesPerPixel: 1,
      pixelRepresentation: ds.PixelRepresentation,
      photometricInterpretation: ds.PhotometricInterpretation,
    },
  };
}

function bytesOf(base64) {
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes.buffer;
}

function base64Of(bytes) {
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

// sources: base64 DICOM files of the source series (any order); seg: the SEG, base64.
// Returns the segments as the viewer lists them (by label value) and, per source
// instance, the label values the viewer paints on its pixels.
window.pacsnodeLoadSeg = async (sources, seg) => {
  const byImageId = {};
  const imageIds = sources.map((source, index) => {
    const imageId = `pacsnode:${index}`;
    byImageId[imageId] = modules(naturalize(bytesOf(source)));
    return imageId;
  });
  metaData.addProvider((type, imageId) => byImageId[imageId]?.[type], 10000);
  const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
    imageIds, bytesOf(seg), { metadataProvider: metaData, tolerance: 1e-3 });
  const segments = [];
  result.segMetadata.data.forEach((item, value) => {
    if (value === 0 || !item) return; // OHIF lists index 1 onwards
    segments.push({
      value, number: Number(item.SegmentNumber), label: item.SegmentLabel,
      lab: item.RecommendedDisplayCIELabValue ? numbers(item.RecommendedDisplayCIELabValue) : null,
    });
  });
  const layers = Array.isArray(result.labelMapImages[0]) ? result.labelMapImages : [result.labelMapImages];
  const painted = {};
  for (const layer of layers) {
    for (const image of layer) {
      const sop = byImageId[image.referencedImageId].generalImageModule.sopInstanceUID;
      const data = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
      painted[sop] = base64Of(new Uint8Array(data));
    }
  }
  return { segments, painted, layers: layers.length };
};
